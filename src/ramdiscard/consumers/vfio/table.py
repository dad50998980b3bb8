"""The DMA mapping table of a type1 v2 IOMMU container (sans-I/O).

Rules (the kernel's ``vfio_iommu_type1`` with ``VFIO_TYPE1v2_IOMMU``):

* A mapping is ``[iova, iova + size)``; mappings never overlap. A map that overlaps any
  existing mapping is refused (EEXIST).
* An unmap of ``[iova, iova + size)`` removes every mapping lying entirely inside it, in
  one call; holes inside the range are fine, and a range covering nothing removes nothing.
  A range whose start or end falls strictly inside a mapping would cut it in two and is
  refused (EINVAL) with nothing removed.
* At most ``limit`` mappings exist at once (the kernel's ``dma_entry_limit``); a map that
  would exceed it is refused (ENOSPC) with nothing mapped.

Theory of operation: three parallel Python lists sorted by IOVA (starts, ends, payloads).
A lookup is a ``bisect`` of the starts, O(log n). A map of k adjacent mappings (one RDM
populate cut into granules) checks the whole run once and inserts it with one slice
assignment; an unmap finds its index span with two bisects and deletes it with one slice
deletion. The list moves are memmoves in C, so for the table sizes the kernel allows
(65535 by default) an unmap of r mappings costs O(log n + r) Python work. The table holds
no pins: the container pins before :meth:`MappingTable.insert_run` and unpins after
:meth:`MappingTable.remove`.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Generic, TypeVar

from ramdiscard.consumers.vfio.errors import MappingConflict, MappingLimitError, UnmapSplitError

T = TypeVar("T")


class MappingTable(Generic[T]):
    """Non-overlapping IOVA ranges with a payload each; see the module rules."""

    __slots__ = ("_ends", "_payloads", "_starts", "limit", "mapped_bytes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._payloads: list[T] = []
        self.mapped_bytes = 0

    def __len__(self) -> int:
        return len(self._starts)

    def check_map(self, iova: int, end: int, count: int = 1) -> int:
        """The index where ``count`` mappings tiling ``[iova, end)`` go.

        Raises MappingLimitError if the table cannot take ``count`` more, MappingConflict
        if the range overlaps a mapping. Changes nothing.
        """
        if len(self._starts) + count > self.limit:
            raise MappingLimitError(
                f"DMA mapping limit reached: {len(self._starts)} of {self.limit} mappings in use, "
                f"{count} more requested for [{iova:#x}, {end:#x})"
            )
        i = bisect_right(self._starts, iova)
        if i and self._ends[i - 1] > iova:
            raise MappingConflict(
                f"DMA map [{iova:#x}, {end:#x}) overlaps mapping "
                f"[{self._starts[i - 1]:#x}, {self._ends[i - 1]:#x})"
            )
        if i < len(self._starts) and self._starts[i] < end:
            raise MappingConflict(
                f"DMA map [{iova:#x}, {end:#x}) overlaps mapping [{self._starts[i]:#x}, {self._ends[i]:#x})"
            )
        return i

    def insert_run(self, index: int, starts: list[int], ends: list[int], payloads: list[T]) -> None:
        """Insert mappings checked by :meth:`check_map` (same index, ascending, tiling the
        checked range, nothing changed in between)."""
        self._starts[index:index] = starts
        self._ends[index:index] = ends
        self._payloads[index:index] = payloads
        self.mapped_bytes += ends[-1] - starts[0]  # they tile the range

    def unmap_span(self, iova: int, end: int) -> tuple[int, int]:
        """Index span ``[lo, hi)`` of the mappings inside ``[iova, end)``.

        Raises UnmapSplitError when ``iova`` or ``end`` falls strictly inside a mapping.
        Changes nothing.
        """
        starts = self._starts
        lo = bisect_left(starts, iova)
        if lo and self._ends[lo - 1] > iova:
            raise UnmapSplitError(
                f"DMA unmap [{iova:#x}, {end:#x}) would split mapping "
                f"[{starts[lo - 1]:#x}, {self._ends[lo - 1]:#x})"
            )
        hi = bisect_left(starts, end, lo)
        if hi > lo and self._ends[hi - 1] > end:
            raise UnmapSplitError(
                f"DMA unmap [{iova:#x}, {end:#x}) would split mapping "
                f"[{starts[hi - 1]:#x}, {self._ends[hi - 1]:#x})"
            )
        return lo, hi

    def find(self, iova: int) -> int | None:
        """Index of the mapping containing ``iova``, or None."""
        i = bisect_right(self._starts, iova) - 1
        if i >= 0 and self._ends[i] > iova:
            return i
        return None

    def span(self, lo: int, hi: int) -> tuple[list[int], list[T]]:
        """``(starts, payloads)`` of the mappings ``[lo, hi)`` (copies)."""
        return self._starts[lo:hi], self._payloads[lo:hi]

    def start_at(self, index: int) -> int:
        return self._starts[index]

    def payload_at(self, index: int) -> T:
        return self._payloads[index]

    def items(self) -> list[tuple[int, T]]:
        """Every ``(iova, payload)`` in IOVA order."""
        return list(zip(self._starts, self._payloads, strict=True))

    def extent(self) -> tuple[int, int] | None:
        """``(first start, last end)`` of the mappings, or None when there are none."""
        if not self._starts:
            return None
        return self._starts[0], self._ends[-1]

    def remove(self, lo: int, hi: int) -> int:
        """Delete the mappings ``[lo, hi)``; return the bytes they covered."""
        if hi - lo == 1:
            nbytes = self._ends[lo] - self._starts[lo]
        else:
            nbytes = sum(self._ends[lo:hi]) - sum(self._starts[lo:hi])
        del self._starts[lo:hi]
        del self._ends[lo:hi]
        del self._payloads[lo:hi]
        self.mapped_bytes -= nbytes
        return nbytes
