"""Guest-physical reads and writes onto a machine's RAM blocks (what the guest workload
uses to write and verify its patterns).

Rules: an access must lie inside one RAM range (boot RAM or one device's memory), else
InvalidArgument and nothing is touched. Accesses go straight to the host mapping; the
caller (the guest model) only touches memory it has plugged.
"""

from __future__ import annotations

import ctypes

from ramdiscard.errors import InvalidArgument
from ramdiscard.hostmem import RamBlock


class GuestMemory:
    """The machine's guest-physical RAM ranges; see the module rules."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, RamBlock]] = []
        """(guest-physical start, size, RAM block) of each RAM range."""

    def _find(self, gpa: int, length: int) -> tuple[RamBlock, int]:
        for start, size, block in self.ranges:
            if start <= gpa and gpa + length <= start + size:
                return block, gpa - start
        raise InvalidArgument(f"guest access [{gpa:#x}, +{length:#x}) is not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        block, off = self._find(gpa, len(data))
        block.view[off : off + len(data)] = data

    def fill(self, gpa: int, size: int, byte: int) -> None:
        block, off = self._find(gpa, size)
        ctypes.memset(block.host_address + off, byte, size)

    def read(self, gpa: int, length: int) -> bytes:
        block, off = self._find(gpa, length)
        return bytes(block.view[off : off + length])
