"""One RAM block as the block mapper keeps it: its IOVA range, mode and pins (sans-I/O).

Rules:

* A :class:`MappedBlock` is created when the mapper starts following a block and lives
  until the block leaves the registry. It holds no pins itself: the mapper pins through
  its backend and records each pin here (:meth:`MappedBlock.add`) and forgets it here
  before unpinning it (:meth:`MappedBlock.remove`).
* Pins are kept sorted by region offset and never overlap; every lookup is a bisect.
* :class:`MappingMode` is the block's mode (see :mod:`ramdiscard.consumers.blockdma.mapper`
  for when each applies); :class:`BlockStatus` is the snapshot the mapper reports.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from enum import StrEnum

from ramdiscard.consumers.dma.backend import PAGE_SIZE, PinHandle
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.rdm.listener import RamDiscardListener


class MappingMode(StrEnum):
    WHOLE = "whole"
    LISTENER = "listener"
    PARKED = "parked"
    FAILED = "failed"


@dataclass(frozen=True)
class BlockStatus:
    """One block as the mapper sees it (a snapshot)."""

    name: str
    iova: int
    iova_size: int
    mode: MappingMode
    pinned_bytes: int
    pins: int
    error: BaseException | None = None


@dataclass
class Pin:
    """One backend pin of ``[offset, +size)`` in region offsets."""

    offset: int
    size: int
    handle: PinHandle

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(eq=False)
class MappedBlock:
    """A followed block: ``region``, its IOVA range ``[iova, +iova_size)``, mode, pins,
    the listener registered for it (``listener`` mode) and the last setup error."""

    region: MemoryRegion
    iova: int
    iova_size: int
    mode: MappingMode = MappingMode.PARKED
    listener: RamDiscardListener | None = None
    error: BaseException | None = None
    # Sorted by region offset; parallel lists keep bisect cheap.
    _starts: list[int] = field(default_factory=list, init=False, repr=False)
    _pins: list[Pin] = field(default_factory=list, init=False, repr=False)

    @property
    def host_address(self) -> int:
        ram = self.region.ram
        assert ram is not None
        return int(ram.host_address)

    @property
    def used_size(self) -> int:
        ram = self.region.ram
        assert ram is not None
        return int(ram.size)

    @property
    def page_size(self) -> int:
        """The backing's page size (at least the DMA page size)."""
        ram = self.region.ram
        assert ram is not None
        return max(PAGE_SIZE, int(ram.page_size))

    @property
    def pinned_bytes(self) -> int:
        return sum(p.size for p in self._pins)

    @property
    def pinned_end(self) -> int:
        """The end of the last pin, 0 without pins."""
        return max((p.end for p in self._pins), default=0)

    def pins(self) -> list[Pin]:
        """Every pin, in offset order (a copy)."""
        return list(self._pins)

    def status(self) -> BlockStatus:
        return BlockStatus(
            self.region.name,
            self.iova,
            self.iova_size,
            self.mode,
            self.pinned_bytes,
            len(self._pins),
            self.error,
        )

    def add(self, pin: Pin) -> None:
        """Record ``pin`` (which overlaps no recorded pin)."""
        i = bisect_left(self._starts, pin.offset)
        self._starts.insert(i, pin.offset)
        self._pins.insert(i, pin)

    def remove(self, pin: Pin) -> None:
        """Forget ``pin`` (which is recorded)."""
        i = bisect_left(self._starts, pin.offset)
        while self._pins[i] is not pin:
            i += 1
        del self._starts[i]
        del self._pins[i]

    def covering(self, offset: int, length: int) -> Pin | None:
        """The pin holding all of ``[offset, +length)``, or None."""
        i = bisect_left(self._starts, offset + 1) - 1
        if i >= 0:
            pin = self._pins[i]
            if offset + length <= pin.end:
                return pin
        return None

    def in_range(self, start: int, end: int) -> tuple[list[Pin], list[Pin]]:
        """``(inside, cut)``: the pins lying inside ``[start, end)``, and those that only
        partly overlap it, in offset order."""
        lo = bisect_left(self._starts, start)
        hi = bisect_left(self._starts, end)
        cut = [self._pins[lo - 1]] if lo and self._pins[lo - 1].end > start else []
        inside: list[Pin] = []
        for pin in self._pins[lo:hi]:
            (cut if pin.end > end else inside).append(pin)
        return inside, cut
