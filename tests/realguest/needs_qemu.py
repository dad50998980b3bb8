"""The marks every real-guest boot test carries: slow, a generous timeout, and a skip
(with find_qemu's one-line reason) only where the patched QEMU is really absent."""

import pytest

from ramdiscard.realguest.qemu import QemuNotFound, find_qemu

try:
    find_qemu()
    NO_QEMU = ""
except QemuNotFound as exc:
    NO_QEMU = str(exc)

BOOT_MARKS = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(bool(NO_QEMU), reason=NO_QEMU)]
