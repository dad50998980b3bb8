"""TouchWorkload: a guest that writes into the memory it gets plugged.

Rules:

* Memory is used in *chunks* of ``chunk_size`` bytes (2 MiB: a transparent huge page, so
  touching one byte would make the whole chunk resident anyway). Chunk ``k`` (counted from
  guest-physical address 0) is used iff ``floor((k + 1) * touch) > floor(k * touch)``: a
  deterministic, evenly spread ``touch`` fraction of every large range.
* A used chunk is filled completely with its pattern byte (``pattern_for(k)``, never 0),
  through the ``GuestMemory.fill`` callback. :meth:`TouchWorkload.verify` reads it back.
* The workload tracks which chunks hold guest data: added on :meth:`plugged`, dropped on
  :meth:`unplugging` and :meth:`unplugged_all`. ``touched_bytes`` is what a guest would
  count as used memory.
"""

from __future__ import annotations

from typing import Protocol

from ramdiscard.units import MiB


class GuestMemory(Protocol):
    """Guest-physical memory access (the machine maps GPAs to host memory)."""

    def write(self, gpa: int, data: bytes) -> None: ...

    def fill(self, gpa: int, size: int, byte: int) -> None:
        """Set ``size`` bytes at ``gpa`` to ``byte``."""

    def read(self, gpa: int, length: int) -> bytes: ...


class TouchWorkload:
    """Writes a pattern into a ``touch`` fraction of plugged memory; see the module rules.

    Raises ValueError for ``touch`` outside [0, 1] or a chunk size that is not a positive
    multiple of 4 KiB.
    """

    def __init__(self, memory: GuestMemory, *, touch: float = 1.0, chunk_size: int = 2 * MiB) -> None:
        if not 0.0 <= touch <= 1.0:
            raise ValueError(f"touch must be in [0, 1], got {touch}")
        if chunk_size <= 0 or chunk_size % 4096:
            raise ValueError(f"chunk size must be a positive multiple of 4 KiB, got {chunk_size}")
        self.memory = memory
        self.touch = touch
        self.chunk_size = chunk_size
        self._used: set[int] = set()
        self.bytes_written = 0

    @staticmethod
    def pattern_for(chunk: int) -> int:
        return (chunk * 0x9E + 0x5A) % 255 + 1

    def selected(self, chunk: int) -> bool:
        return int((chunk + 1) * self.touch) > int(chunk * self.touch)

    @property
    def touched_bytes(self) -> int:
        return len(self._used) * self.chunk_size

    def _chunks(self, gpa: int, size: int) -> range:
        return range(gpa // self.chunk_size, -(-(gpa + size) // self.chunk_size))

    def plugged(self, gpa: int, size: int) -> None:
        for k in self._chunks(gpa, size):
            if not self.selected(k) or k in self._used:
                continue
            start = max(gpa, k * self.chunk_size)
            end = min(gpa + size, (k + 1) * self.chunk_size)
            self.memory.fill(start, end - start, self.pattern_for(k))
            self.bytes_written += end - start
            self._used.add(k)

    def unplugging(self, gpa: int, size: int) -> None:
        for k in self._chunks(gpa, size):
            self._used.discard(k)

    def unplugged_all(self) -> None:
        self._used.clear()

    def clone(self, memory: GuestMemory) -> TouchWorkload:
        """This workload's state (which chunks hold their pattern) over ``memory``: the
        workload after a migration or a snapshot restore. The original is unchanged."""
        twin = TouchWorkload(memory, touch=self.touch, chunk_size=self.chunk_size)
        twin._used = set(self._used)
        twin.bytes_written = self.bytes_written
        return twin

    def verify(self) -> list[int]:
        """Chunks whose first and last byte do not hold their pattern (should be empty)."""
        bad: list[int] = []
        for k in sorted(self._used):
            byte = self.pattern_for(k)
            start = k * self.chunk_size
            head = self.memory.read(start, 1)
            tail = self.memory.read(start + self.chunk_size - 1, 1)
            if head != bytes([byte]) or tail != bytes([byte]):
                bad.append(k)
        return bad
