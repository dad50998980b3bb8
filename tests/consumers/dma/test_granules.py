"""granule_bounds / granule_pieces / granule_starts: the one cut of a range into per-granule
pieces."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.consumers.dma.granules import granule_bounds, granule_pieces, granule_starts
from ramdiscard.errors import InvalidArgument


@given(st.integers(0, 1 << 30), st.integers(0, 1 << 26), st.integers(12, 24))
def test_pieces_tile_the_range_and_never_straddle_a_granule(start: int, length: int, shift: int) -> None:
    g = 1 << shift
    end = start + length
    starts, ends = granule_bounds(start, end, g)
    assert list(granule_pieces(start, end, g)) == list(zip(starts, ends, strict=True))
    if length == 0:
        assert starts == ends == []
        return
    assert starts[0] == start and ends[-1] == end
    assert starts[1:] == ends[:-1]
    for s, e in zip(starts, ends, strict=True):
        assert s < e and s // g == (e - 1) // g  # inside one granule
    assert all(s % g == 0 for s in starts[1:])  # cut exactly at the multiples


@given(
    st.integers(0, 1 << 30), st.integers(0, 1 << 26), st.integers(12, 24), st.integers(-(1 << 40), 1 << 40)
)
def test_shifted_starts_and_sizes_are_the_same_cut(start: int, length: int, shift: int, base: int) -> None:
    g = 1 << shift
    starts, ends = granule_bounds(start, start + length, g)
    shifted, sizes = granule_starts(start, start + length, g, base)
    assert shifted == [s + base for s in starts]
    assert sizes == [e - s for s, e in zip(starts, ends, strict=True)]


def test_bad_arguments_raise_at_the_call() -> None:
    with pytest.raises(InvalidArgument, match="power of two"):
        granule_pieces(0, 4096, 3000)
    with pytest.raises(InvalidArgument, match="negative"):
        granule_bounds(-4096, 4096, 4096)
    with pytest.raises(InvalidArgument, match="power of two"):
        granule_starts(0, 4096, 3000, 1 << 20)
    with pytest.raises(InvalidArgument, match="negative"):
        granule_starts(-4096, 4096, 4096)
