"""PlugStateManager: the RamDiscardManager of a region whose state is a plug-state core.

Rules:

* Populated means plugged: every query is answered from the :class:`~.state.PlugState`
  given at construction, under the manager lock, in virtio-mem's semantics (a block is
  populated only while plugged and inside the usable region; granularity = block size).
* The class changes no state. Its owner (:class:`~.device.VirtioMem`) changes the core
  only through guest requests and notifies listeners through the manager's engine; it
  answers BlockStateManager's block-state queries (granularity, runs, counts, bitmap)
  without its set_populated/set_discarded, so it is a virtual subclass of
  :class:`~ramdiscard.rdm.block_state.BlockStateManager`, not an inherited implementation.
* Sections must belong to the managed region (``check_section``: InvalidArgument
  otherwise, nothing changes); replays call ``fn`` once per maximal run, ascending,
  clipped to the section, and stop at the first exception.
"""

from __future__ import annotations

from collections.abc import Iterator

from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.providers.virtio_mem.state import PlugState
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.manager import RamDiscardManager, ReplayFn


class PlugStateManager(RamDiscardManager):
    """The manager of ``memory``'s region over the plug-state core ``plug``; see the
    module rules."""

    def __init__(self, memory: MemoryRegion, plug: PlugState) -> None:
        super().__init__(memory)
        self._plug = plug

    # -- sizes of the core ----------------------------------------------------------------

    @property
    def block_size(self) -> int:
        return self._plug.block_size

    @property
    def addr(self) -> int:
        return self._plug.addr

    @property
    def region_size(self) -> int:
        return self._plug.region_size

    @property
    def usable_region_size(self) -> int:
        return self._plug.usable_region_size

    @property
    def usable_extent(self) -> int:
        """Added to ``requested_size`` (rounded up to blocks) when sizing the usable region."""
        return self._plug.usable_extent

    def usable_region_for(self, requested: int) -> int:
        """The usable region size the sizing rule gives ``requested``: 0 for 0, else
        ``min(region_size, align_up(requested + usable_extent, block_size))``."""
        return self._plug.usable_for(requested)

    @property
    def plugged_size(self) -> int:
        """Bytes plugged: popcount(bitmap) * block_size."""
        return self._plug.plugged_size

    populated_size = plugged_size

    # -- the RamDiscardManager interface -------------------------------------------------

    def get_min_granularity(self, mr: MemoryRegion) -> int:
        self.check_region(mr)
        return self._plug.block_size

    def is_populated(self, section: MemoryRegionSection) -> bool:
        """True only if every block touched by ``section`` (widened to block boundaries) is
        plugged and inside the usable region; False for empty sections."""
        with self.lock:
            self.check_section(section)
            return self._plug.all_plugged(section.offset_within_region, section.size)

    def replay_populated(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        self._replay(section, fn, True)

    def replay_discarded(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        self._replay(section, fn, False)

    def _replay(self, section: MemoryRegionSection, fn: ReplayFn, plugged: bool) -> None:
        with self.lock:
            self.check_section(section)
            intersect = section.intersect
            for start, end in self._plug.runs(section.offset_within_region, section.size, plugged):
                fn(intersect(start, end - start))  # type: ignore[arg-type]  # runs lie inside the section

    # -- block-state queries ---------------------------------------------------------------

    @property
    def granularity(self) -> int:
        return self._plug.block_size

    @property
    def nb_blocks(self) -> int:
        return self._plug.nb_blocks

    def populated_runs(self, offset: int = 0, size: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal plugged runs ``(start, end)`` in region offsets, clipped to the range
        (default: the whole region). Raises InvalidArgument for a range outside it."""
        return self._plug.runs(offset, self._plug.region_size - offset if size is None else size, True)

    def discarded_runs(self, offset: int = 0, size: int | None = None) -> Iterator[tuple[int, int]]:
        """Maximal unplugged runs, as :meth:`populated_runs`."""
        return self._plug.runs(offset, self._plug.region_size - offset if size is None else size, False)

    def plugged_ranges(self) -> Iterator[tuple[int, int]]:
        """Maximal plugged runs as (region offset, size), ascending."""
        for start, end in self.populated_runs():
            yield start, end - start

    def is_range_populated(self, offset: int, size: int) -> bool:
        """Every block of the block-aligned, non-empty range is plugged."""
        return self.count_populated(offset, size) == size

    def count_populated(self, offset: int, size: int) -> int:
        """Plugged bytes in the block-aligned, non-empty range (InvalidArgument otherwise)."""
        return self._plug.count_plugged(offset, size)

    def bitmap_bytes(self) -> bytes:
        """The plug state as a little-endian bitmap, one bit per block."""
        with self.lock:
            return self._plug.bitmap_bytes()


BlockStateManager.register(PlugStateManager)
