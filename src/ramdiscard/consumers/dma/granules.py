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
:func:`granule_pieces` is the same cut as pairs; :func:`granule_starts` the same cut as
shifted starts and sizes, for a consumer that needs the pieces in another address base
(IOVA, host address) without building the region offsets first.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import repeat

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


def granule_starts(start: int, end: int, granularity: int, base: int = 0) -> tuple[list[int], list[int]]:
    """``(starts, sizes)`` of the pieces of ``[start, end)`` cut as :func:`granule_bounds`
    does, each start shifted by ``base``: ``starts[i] == base + bounds[0][i]`` and
    ``sizes[i] == bounds[1][i] - bounds[0][i]``. Both empty for ``end <= start``. The
    inner pieces' sizes are one shared int, so a cut of n pieces allocates n ints.

    Raises InvalidArgument like :func:`granule_bounds`.
    """
    if granularity <= 0 or granularity & (granularity - 1):  # is_power_of_2() inline
        raise InvalidArgument(f"granularity {granularity:#x} is not a power of two")
    if start < 0:
        raise InvalidArgument(f"negative start {start:#x}")
    if end <= start:
        return [], []
    first = (start | (granularity - 1)) + 1
    if first >= end:
        return [start + base], [end - start]
    starts = [start + base, *range(first + base, end + base, granularity)]
    last = starts[-1] - base
    return starts, [first - start, *repeat(granularity, len(starts) - 2), end - last]
