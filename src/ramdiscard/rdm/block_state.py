"""BlockStateManager: a RamDiscardManager over a bitmap of fixed-size blocks.

Rules:

* The region is split into ``granularity``-sized blocks (a power of two dividing the
  region size). A set bit means populated, a clear bit discarded; everything starts
  discarded.
* ``set_populated(offset, size)`` notifies populate for the discarded runs of the range
  (never for memory already populated) and sets the bits only after every listener
  accepted. A refusal rolls back every listener for every run notified so far and
  re-raises; the bitmap is unchanged.
* ``set_discarded(offset, size)`` notifies discard for the populated runs of the range,
  then clears the bits. Every listener hears every run even if some raise; the bits are
  cleared regardless and the failures are then raised as one DiscardNotificationError.
* Queries widen a section outward to block boundaries; ``is_populated`` of an empty
  section is False (virtio-mem's answer).

Providers such as guest_memfd attributes subclass this and add their own policy: which
ranges are valid, what happens to host memory, and in which order. (virtio-mem keeps its
block state in its own sans-I/O core, :mod:`ramdiscard.providers.virtio_mem.state`.)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ramdiscard.errors import InvalidArgument
from ramdiscard.rdm.bitmap import Bitmap
from ramdiscard.rdm.manager import RamDiscardManager, ReplayFn
from ramdiscard.units import is_power_of_2

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.memory.section import MemoryRegionSection


class BlockStateManager(RamDiscardManager):
    """Populated/discarded state of ``mr`` at ``granularity``; see the module rules."""

    def __init__(self, mr: MemoryRegion, granularity: int) -> None:
        super().__init__(mr)
        if not is_power_of_2(granularity):
            raise InvalidArgument(f"granularity {granularity:#x} is not a power of two")
        if mr.size % granularity:
            raise InvalidArgument(
                f"region {mr.name!r} size {mr.size:#x} is not a multiple of the granularity {granularity:#x}"
            )
        self._granularity = granularity
        self._shift = granularity.bit_length() - 1
        self._bitmap = Bitmap(mr.size >> self._shift)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.region.name!r} granularity={self._granularity:#x}>"

    # -- queries ----------------------------------------------------------------------

    @property
    def granularity(self) -> int:
        return self._granularity

    @property
    def nb_blocks(self) -> int:
        return self._bitmap.nbits

    @property
    def populated_size(self) -> int:
        """Bytes populated (popcount times granularity)."""
        return self._bitmap.count << self._shift

    def get_min_granularity(self, mr: MemoryRegion) -> int:
        self.check_region(mr)
        return self._granularity

    def is_populated(self, section: MemoryRegionSection) -> bool:
        with self._lock:
            self.check_section(section)
            if section.size == 0:
                return False
            first, last = self._block_span(section.offset_within_region, section.size)
            return self._bitmap.all_set(first, last)

    def replay_populated(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        self._replay(section, fn, True)

    def replay_discarded(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        self._replay(section, fn, False)

    def _replay(self, section: MemoryRegionSection, fn: ReplayFn, value: bool) -> None:
        with self._lock:
            self.check_section(section)
            if section.size == 0:
                return
            # Block runs widened to bytes and clipped by intersect (runs lie inside the
            # widened section, so intersect never returns None).
            first, last = self._block_span(section.offset_within_region, section.size)
            intersect = section.intersect
            g = self._shift
            for s, e in self._bitmap.runs(first, last, value):
                fn(intersect(s << g, (e - s) << g))  # type: ignore[arg-type]

    def runs(
        self, offset: int = 0, size: int | None = None, populated: bool = True
    ) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(start, end)`` in region offsets with the given state, ascending,
        clipped to ``[offset, offset + size)`` (default: the whole region)."""
        if size is None:
            size = self.region.size - offset
        if offset < 0 or size < 0 or offset + size > self.region.size:
            raise InvalidArgument(f"range [{offset:#x}, +{size:#x}) outside {self.region.name!r}")
        if size == 0:
            return
        first, last = self._block_span(offset, size)
        g = self._shift
        end = offset + size
        runs = self._bitmap.runs(first, last, populated)
        head = next(runs, None)
        if head is None:
            return
        yield max(head[0] << g, offset), min(head[1] << g, end)
        for s, e in runs:
            e <<= g
            yield s << g, (e if e < end else end)

    def populated_runs(self, offset: int = 0, size: int | None = None) -> Iterator[tuple[int, int]]:
        return self.runs(offset, size, True)

    def discarded_runs(self, offset: int = 0, size: int | None = None) -> Iterator[tuple[int, int]]:
        return self.runs(offset, size, False)

    def is_range_populated(self, offset: int, size: int) -> bool:
        """Every block of the aligned range is populated."""
        first, last = self._aligned_blocks(offset, size)
        return self._bitmap.all_set(first, last)

    def is_range_discarded(self, offset: int, size: int) -> bool:
        """Every block of the aligned range is discarded."""
        first, last = self._aligned_blocks(offset, size)
        return self._bitmap.all_clear(first, last)

    def count_populated(self, offset: int, size: int) -> int:
        """Populated bytes in the aligned range."""
        first, last = self._aligned_blocks(offset, size)
        return self._bitmap.count_range(first, last) << self._shift

    def bitmap_bytes(self) -> bytes:
        """The state as a little-endian bitmap, one bit per block."""
        with self._lock:
            return self._bitmap.to_bytes()

    # -- state changes ------------------------------------------------------------------

    def set_populated(self, offset: int, size: int) -> None:
        """Mark an aligned range populated, notifying listeners first (see module rules).

        Raises InvalidArgument for a bad range, ListenerError from inside a notification,
        or the refusing listener's exception after the rollback; no change then.
        """
        with self._lock:
            self._check_not_notifying("change state")
            first, last = self._aligned_blocks(offset, size)
            self._populate_blocks(first, last)

    def set_discarded(self, offset: int, size: int) -> None:
        """Mark an aligned range discarded, notifying discard for its populated runs.

        Raises InvalidArgument for a bad range (no change), ListenerError from inside a
        notification (no change), or DiscardNotificationError if listeners raised: every
        listener was told and the range is discarded all the same.
        """
        with self._lock:
            self._check_not_notifying("change state")
            first, last = self._aligned_blocks(offset, size)
            self._discard_blocks(first, last)

    def _populate_blocks(self, first: int, last: int) -> None:
        g = self._shift
        runs = list(self._bitmap.runs(first, last, False))
        self._notify_populate_runs([(s << g, (e - s) << g) for s, e in runs])
        for s, e in runs:
            self._bitmap.set_range(s, e)

    def _discard_blocks(self, first: int, last: int) -> None:
        g = self._shift
        runs = list(self._bitmap.runs(first, last, True))
        try:
            self._notify_discard_runs([(s << g, (e - s) << g) for s, e in runs])
        finally:
            for s, e in runs:
                self._bitmap.clear_range(s, e)

    def _discard_all_blocks(self) -> None:
        """Everything to discarded: whole-section discards to double-discard listeners."""
        g = self._shift
        runs = [(s << g, (e - s) << g) for s, e in self._bitmap.runs(0, self._bitmap.nbits, True)]
        try:
            if runs:
                self._notify_discard_all(runs)
        finally:
            self._bitmap.clear_all()

    # -- argument checks ------------------------------------------------------------------

    def _aligned_blocks(self, offset: int, size: int) -> tuple[int, int]:
        g = self._granularity
        if offset < 0 or size <= 0 or offset % g or size % g or offset + size > self.region.size:
            raise InvalidArgument(
                f"range [{offset:#x}, +{size:#x}) of {self.region.name!r} must be non-empty, "
                f"aligned to {g:#x} and inside the region (size {self.region.size:#x})"
            )
        return offset >> self._shift, (offset + size) >> self._shift

    def _block_span(self, offset: int, size: int) -> tuple[int, int]:
        """Blocks covering ``[offset, offset+size)``, widened outward."""
        g = self._granularity
        return offset >> self._shift, (offset + size + g - 1) >> self._shift
