"""Which file object a process maps (no QEMU needed: this process maps its own memfd),
and the device-region window over the guest-RAM memfd."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from ramdiscard.errors import InvalidArgument
from ramdiscard.hostmem import RamBlock
from ramdiscard.realguest.memfd import MemfdWindow, WindowError, file_identity, mapped_identities
from ramdiscard.units import MiB


@pytest.fixture
def block() -> Iterator[RamBlock]:
    b = RamBlock(8 * MiB, "memfd", name="memfd-identity-test")
    yield b
    b.close()


def test_own_mapping_of_the_memfd_is_found_by_inode(block: RamBlock) -> None:
    assert block.fd is not None
    identity = file_identity(block.fd)
    found = mapped_identities(os.getpid(), 2 * MiB, 4 * MiB)
    assert identity in {(dev, ino) for dev, ino, _off, _len in found}
    # A range past the end of the file is covered by no mapping of it.
    beyond = mapped_identities(os.getpid(), 6 * MiB, 4 * MiB)
    assert identity not in {(dev, ino) for dev, ino, _off, _len in beyond}


def test_another_memfd_is_another_object(block: RamBlock) -> None:
    other = RamBlock(8 * MiB, "memfd", name="memfd-identity-other")
    try:
        assert block.fd is not None and other.fd is not None
        assert file_identity(block.fd) != file_identity(other.fd)
    finally:
        other.close()


def test_a_process_that_is_gone_is_a_one_line_error() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    with pytest.raises(WindowError, match=f"process {child.pid}") as info:
        mapped_identities(child.pid, 0, 4096)
    assert "\n" not in str(info.value)


def test_window_offsets_and_bounds(block: RamBlock) -> None:
    window = MemfdWindow(block, 2 * MiB, 4 * MiB)
    window.populate(0, 2 * MiB)
    assert block.resident_bytes(2 * MiB, 2 * MiB) == 2 * MiB
    assert block.resident_bytes(0, 2 * MiB) == 0
    assert window.resident_bytes() == 2 * MiB
    window.discard_range(0, 2 * MiB)
    assert block.resident_bytes() == 0
    window.populate(2 * MiB, 2 * MiB)
    with pytest.raises(InvalidArgument, match="outside the 0x400000-byte window; nothing changed"):
        window.discard_range(2 * MiB, 4 * MiB)
    with pytest.raises(InvalidArgument, match="outside"):
        window.populate(-1, 1)
    assert block.resident_bytes() == window.resident_bytes() == 2 * MiB
