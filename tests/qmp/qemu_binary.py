"""Where the real QEMU for differential tests is: ``RAMDISCARD_QEMU``, else the build
``scripts/build-qemu.sh`` leaves in /var/cache/ramdiscard (the same lookup as
``ramdiscard.realguest.qemu.find_qemu``)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_QEMU = Path("/var/cache/ramdiscard/qemu-10.0.2-vhostdev/bin/qemu-system-x86_64")


def find_qemu() -> tuple[Path | None, str]:
    """(binary, "") when found, else (None, the precise reason it is not)."""
    env = os.environ.get("RAMDISCARD_QEMU")
    if env:
        path = Path(env)
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"RAMDISCARD_QEMU={env} is not an executable file"
    if CACHE_QEMU.is_file() and os.access(CACHE_QEMU, os.X_OK):
        return CACHE_QEMU, ""
    return None, f"no QEMU: RAMDISCARD_QEMU is unset and {CACHE_QEMU} does not exist (scripts/build-qemu.sh)"
