"""The device region as a window of the guest-RAM memfd, and which file object a process maps.

Rules: :class:`MemfdWindow` is ``size`` bytes at ``offset`` of a RAM block, as a RAM block
of its own (discard = hole punch in the memfd at ``offset + o``). A range outside the
window raises InvalidArgument before anything changes (the
:class:`~ramdiscard.interfaces.DiscardableMemory` contract); alignment and the rest are
the underlying block's checks.
:func:`file_identity` is the (st_dev, st_ino) of an open descriptor;
:func:`mapped_identities` reads ``/proc/<pid>/maps`` and returns the (st_dev, st_ino, file
offset, length) of every file mapping that covers ``[offset, offset + length)`` of some
file, so a caller can tell whether another process maps the same object at that range.
"""

from __future__ import annotations

import os

from ramdiscard.errors import HostError, InvalidArgument
from ramdiscard.hostmem import RamBlock


class WindowError(HostError):
    """An unreadable /proc maps file (the process is gone)."""


class MemfdWindow:
    """``size`` bytes at ``offset`` of a RAM block, as a RAM block of its own (host memory,
    discard, populate, resident bytes); see the module rules."""

    def __init__(self, block: RamBlock, offset: int, size: int) -> None:
        self.block, self.offset, self._size = block, offset, size

    @property
    def size(self) -> int:
        return self._size

    @property
    def host_address(self) -> int:
        return self.block.host_address + self.offset

    @property
    def page_size(self) -> int:
        return self.block.page_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise InvalidArgument(
                f"range {offset:#x}+{length:#x} outside the {self._size:#x}-byte window; nothing changed"
            )

    def discard_range(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.block.discard_range(self.offset + offset, length)

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        self._check(offset, length)
        self.block.populate(self.offset + offset, length, write=write)

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        length = self._size - offset if length is None else length
        self._check(offset, length)
        return self.block.resident_bytes(self.offset + offset, length)


def file_identity(fd: int) -> tuple[int, int]:
    """(st_dev, st_ino) of the open file ``fd``."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def mapped_identities(pid: int, offset: int, length: int) -> list[tuple[int, int, int, int]]:
    """(st_dev, st_ino, file offset, length) of each file mapping of ``pid`` that covers
    file bytes ``[offset, offset + length)`` entirely. Raises WindowError (one line) when
    the maps file cannot be read (the process is gone)."""
    try:
        with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
            lines = f.readlines()
    except OSError as exc:
        raise WindowError(f"cannot read the mappings of process {pid}: {exc.strerror or exc}") from None
    found: list[tuple[int, int, int, int]] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        span, _perms, off, dev, inode = fields[:5]
        if inode == "0":
            continue
        lo, hi = (int(x, 16) for x in span.split("-"))
        major, minor = (int(x, 16) for x in dev.split(":"))
        start = int(off, 16)
        if start <= offset and offset + length <= start + (hi - lo):
            found.append((os.makedev(major, minor), int(inode), start, hi - lo))
    return found
