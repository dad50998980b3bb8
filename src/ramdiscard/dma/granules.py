"""Cutting a populated range into per-granule DMA mappings (qemu-ram-discard §4.1).

A consumer that maps RamDiscardManager-controlled memory must map every granule
separately: the manager may later discard any granule-aligned part of a range it
populated in one piece, and an IOMMU (vfio type1 v2) cannot unmap part of a mapping.
Pieces are cut at multiples of the granularity *in region offsets*, so a piece never
straddles a granule whatever the section's address; the first and last piece are clipped
to the range.

Shared by every RDM-aware DMA consumer (the vfio container, the RAM-block DMA mapper).
"""

from __future__ import annotations

from collections.abc import Iterator

from ramdiscard.errors import InvalidArgument
from ramdiscard.units import is_power_of_2


def granule_pieces(start: int, end: int, granularity: int) -> Iterator[tuple[int, int]]:
    """``(piece_start, piece_end)`` for ``[start, end)`` cut at every multiple of
    ``granularity``, ascending. Empty for ``end <= start``.

    Raises InvalidArgument for a granularity that is not a power of two or a negative start.
    """
    if not is_power_of_2(granularity):
        raise InvalidArgument(f"granularity {granularity:#x} is not a power of two")
    if start < 0:
        raise InvalidArgument(f"negative start {start:#x}")
    mask = granularity - 1
    pos = start
    while pos < end:
        stop = min(end, (pos | mask) + 1)
        yield pos, stop
        pos = stop
