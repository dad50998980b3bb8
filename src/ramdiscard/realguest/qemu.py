"""Locating the QEMU binary that real-guest runs need.

Rules: :func:`find_qemu` returns the first of (1) the file named by the environment
variable ``RAMDISCARD_QEMU``, (2) the cached build of ``scripts/build-qemu.sh``
(:data:`QEMU_CACHE_BINARY`). It checks that the file exists and is executable; it does not
start it. When neither is usable it raises :class:`QemuNotFound`, whose message is one
line naming what is missing and the script that builds it.
"""

from __future__ import annotations

import os
from pathlib import Path

from ramdiscard.errors import HostError

QEMU_VERSION = "10.0.2"
QEMU_CACHE_DIR = Path(f"/var/cache/ramdiscard/qemu-{QEMU_VERSION}-vhostdev")
"""Install prefix of ``scripts/build-qemu.sh``."""
QEMU_CACHE_BINARY = QEMU_CACHE_DIR / "bin" / "qemu-system-x86_64"
QEMU_ENV = "RAMDISCARD_QEMU"
BUILD_SCRIPT = "scripts/build-qemu.sh"


class QemuNotFound(HostError):
    """No usable QEMU with a user-creatable vhost-user-device-pci was found."""


def _usable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_qemu() -> Path:
    """The QEMU binary to run: ``$RAMDISCARD_QEMU`` if set, else the cached build.

    Raises QemuNotFound (one line) if ``$RAMDISCARD_QEMU`` is set but not an executable
    file, or if it is unset and the cached build is absent.
    """
    override = os.environ.get(QEMU_ENV)
    if override:
        path = Path(override)
        if not _usable(path):
            raise QemuNotFound(f"{QEMU_ENV}={override} is not an executable file")
        return path
    if _usable(QEMU_CACHE_BINARY):
        return QEMU_CACHE_BINARY
    raise QemuNotFound(
        f"QEMU {QEMU_VERSION} with a user-creatable vhost-user-device-pci is missing "
        f"({QEMU_CACHE_BINARY}); build it once with {BUILD_SCRIPT} (or set {QEMU_ENV})"
    )
