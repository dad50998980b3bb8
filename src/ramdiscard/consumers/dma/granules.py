"""Cutting a populated range into per-granule DMA mappings (qemu-ram-discard §4.1).

A consumer that maps RamDiscardManager-controlled memory must map every granule
separately: the manager may later discard any granule-aligned part of a range it
populated in one piece, and an IOMMU (vfio type1 v2) cannot unmap part of a mapping.
Pieces are cut at multiples of the granularity *in region offsets*, so a piece never
straddles a granule whatever the section's address; the first and last piece are clipped
to the range.

Shared by every RDM-aware DMA consumer (the vfio container, the RAM-block DMA mapper).
:func:`granule_bounds` is the one implementation (two lists, built with ``range`` so a
populate of thousands of granules costs a few list operations);
:func:`granule_pieces` is the same cut as pairs.
"""

from __future__ import annotations

from collections.abc import Iterator

from ramdiscard.errors import InvalidArgument
from ramdiscard.units import is_power_of_2


def granule_bounds(start: int, end: int, granularity: int) -> tuple[list[int], list[int]]:
    """``(starts, ends)`` of ``[start, end)`` cut at every multiple of ``granularity``,
    ascending; ``starts[i] < ends[i] == starts[i + 1]``. Both empty for ``end <= start``.

    Raises InvalidArgument for a granularity that is not a power of two or a negative start.
    """
    if not is_power_of_2(granularity):
        raise InvalidArgument(f"granularity {granularity:#x} is not a power of two")
    if start < 0:
        raise InvalidArgument(f"negative start {start:#x}")
    if end <= start:
        return [], []
    first = (start | (granularity - 1)) + 1
    if first >= end:
        return [start], [end]
    inner = range(first, end, granularity)
    return [start, *inner], [*inner, end]


def granule_pieces(start: int, end: int, granularity: int) -> Iterator[tuple[int, int]]:
    """``(piece_start, piece_end)`` for ``[start, end)`` cut as :func:`granule_bounds`
    does, ascending. Empty for ``end <= start``.

    Raises InvalidArgument (at the call, not on iteration) like :func:`granule_bounds`.
    """
    starts, ends = granule_bounds(start, end, granularity)
    return zip(starts, ends, strict=True)
