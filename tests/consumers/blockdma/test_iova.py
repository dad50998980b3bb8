"""IOVA allocator: unit cases and a model-based test of alloc/free sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ramdiscard.consumers.blockdma import IovaAllocator, IovaExhausted
from ramdiscard.errors import InvalidArgument
from ramdiscard.units import MiB

A = 2 * MiB


def test_first_fit_alignment_and_reuse() -> None:
    iova = IovaAllocator(0x4000_0000, 64 * MiB, align=A)
    a = iova.alloc(3 * MiB)  # rounded up to 4 MiB
    b = iova.alloc(1)
    c = iova.alloc(8 * MiB, 8 * MiB)
    assert (a, b, c) == (0x4000_0000, 0x4040_0000, 0x4080_0000)
    assert iova.free_ranges() == [(0x4060_0000, 0x4080_0000), (0x4100_0000, 0x4400_0000)]
    iova.free(a)
    assert iova.alloc(4 * MiB) == a  # the freed range is the first fit again
    iova.free(b)
    iova.free(a)
    iova.free(c)
    assert iova.free_ranges() == [(0x4000_0000, 0x4400_0000)]  # fully coalesced


def test_exhaustion_and_bad_arguments_change_nothing() -> None:
    iova = IovaAllocator(0, 8 * MiB, align=A)
    iova.alloc(4 * MiB)
    before = iova.free_ranges()
    with pytest.raises(IovaExhausted, match="no free range of 6 MiB"):
        iova.alloc(6 * MiB)
    for bad in (0, -1, True):
        with pytest.raises(InvalidArgument):
            iova.alloc(bad)
    with pytest.raises(InvalidArgument, match="power of two"):
        iova.alloc(A, 3 * MiB)
    with pytest.raises(InvalidArgument, match="no IOVA range"):
        iova.free(A)
    assert iova.free_ranges() == before
    with pytest.raises(InvalidArgument):
        IovaAllocator(1, 8 * MiB, align=A)
    with pytest.raises(InvalidArgument):
        IovaAllocator(0, 0, align=A)


class IovaModel(RuleBasedStateMachine):
    """Random alloc/free against a model of the window as a set of granules."""

    BASE = 64 * A
    GRANULES = 64

    def __init__(self) -> None:
        super().__init__()
        self.iova = IovaAllocator(self.BASE, self.GRANULES * A, align=A)
        self.live: dict[int, int] = {}  # start -> length

    def used(self) -> set[int]:
        return {g for start, length in self.live.items() for g in range(start // A, (start + length) // A)}

    def first_fit(self, length: int, align: int) -> int | None:
        used = self.used()
        for g in range(self.BASE // A, self.BASE // A + self.GRANULES):
            start = g * A
            if start % align:
                continue
            span = range(g, g + length // A)
            if span.stop <= self.BASE // A + self.GRANULES and not used.intersection(span):
                return start
        return None

    @rule(blocks=st.integers(1, 12), align_shift=st.integers(0, 3), extra=st.integers(0, A - 1))
    def alloc(self, blocks: int, align_shift: int, extra: int) -> None:
        align = A << align_shift
        length = -(-(blocks * A - extra) // align) * align
        expected = self.first_fit(length, align)
        if expected is None:
            with pytest.raises(IovaExhausted):
                self.iova.alloc(blocks * A - extra, align)
            return
        start = self.iova.alloc(blocks * A - extra, align)
        # The model's first fit counts freed granules as free, so equality also says that
        # freed ranges are reused before fresh space above them.
        assert start == expected
        self.live[start] = length

    @precondition(lambda self: bool(self.live))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        start = data.draw(st.sampled_from(sorted(self.live)))
        self.iova.free(start)
        del self.live[start]

    @invariant()
    def disjoint_inside_and_coalesced(self) -> None:
        ranges = sorted((s, s + n) for s, n in self.live.items())
        for (_, e1), (s2, _) in itertools.pairwise(ranges):
            assert e1 <= s2
        for s, e in ranges:
            assert s >= self.BASE and e <= self.BASE + self.GRANULES * A and s % A == 0
        assert self.iova.allocations() == self.live
        free = self.iova.free_ranges()
        for (_, e1), (s2, _) in itertools.pairwise(free):
            assert e1 < s2  # never two adjacent free ranges
        assert self.iova.free_bytes + sum(self.live.values()) == self.GRANULES * A


TestIovaModel = IovaModel.TestCase
