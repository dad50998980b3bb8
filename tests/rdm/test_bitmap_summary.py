"""Model-based tests of the bitmap's summary level and run extraction: after every range
operation the per-group counts equal a recount of the bits, and runs / counts / all-set
queries equal a naive computation on a Python-int model of the same bits."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ramdiscard.rdm.bitmap import GROUP_BITS, Bitmap

SIZES = st.sampled_from([0, 1, 63, 64, 65, GROUP_BITS, GROUP_BITS + 1, 3 * GROUP_BITS - 5, 5 * GROUP_BITS])


def _naive_runs(model: int, start: int, end: int, value: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = start
    while pos < end:
        if bool((model >> pos) & 1) != value:
            pos += 1
            continue
        e = pos
        while e < end and bool((model >> e) & 1) == value:
            e += 1
        out.append((pos, e))
        pos = e
    return out


def _coarse_runs(model: int, nbits: int, start: int, end: int, value: bool) -> list[tuple[int, int]]:
    """The same as _naive_runs, walking whole 64-bit words when they are uniform."""
    out: list[tuple[int, int]] = []
    pos = start
    full = (1 << 64) - 1
    while pos < end:
        if pos % 64 == 0 and pos + 64 <= end:
            w = (model >> pos) & full
            if w == (full if value else 0):
                if out and out[-1][1] == pos:
                    out[-1] = (out[-1][0], pos + 64)
                else:
                    out.append((pos, pos + 64))
                pos += 64
                continue
            if w == (0 if value else full):
                pos += 64
                continue
        if bool((model >> pos) & 1) == value:
            if out and out[-1][1] == pos:
                out[-1] = (out[-1][0], pos + 1)
            else:
                out.append((pos, pos + 1))
        pos += 1
    return out


def _recount(bm: Bitmap, model: int) -> list[int]:
    ngroups = (bm.nbits + GROUP_BITS - 1) // GROUP_BITS
    mask = (1 << GROUP_BITS) - 1
    return [((model >> (g * GROUP_BITS)) & mask).bit_count() for g in range(ngroups)]


def _boundary(nbits: int) -> st.SearchStrategy[int]:
    aligned = st.integers(0, nbits // GROUP_BITS).map(lambda g: g * GROUP_BITS)
    near = st.tuples(aligned, st.integers(-65, 65)).map(lambda t: t[0] + t[1])
    anywhere = st.integers(0, nbits)
    return st.one_of(aligned, near, anywhere).map(lambda x: min(max(x, 0), nbits))


class BitmapMachine(RuleBasedStateMachine):
    bm: Bitmap
    model: int

    @initialize(nbits=SIZES)
    def make(self, nbits: int) -> None:
        self.bm = Bitmap(nbits)
        self.model = 0

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        a = data.draw(_boundary(self.bm.nbits))
        b = data.draw(_boundary(self.bm.nbits))
        return min(a, b), max(a, b)

    @rule(data=st.data(), value=st.booleans())
    def update(self, data: st.DataObject, value: bool) -> None:
        start, end = self._range(data)
        span = ((1 << (end - start)) - 1) << start
        if value:
            self.bm.set_range(start, end)
            self.model |= span
        else:
            self.bm.clear_range(start, end)
            self.model &= ~span

    @rule()
    def clear_all(self) -> None:
        self.bm.clear_all()
        self.model = 0

    @rule()
    def round_trip(self) -> None:
        self.bm = Bitmap.from_bytes(self.bm.nbits, self.bm.to_bytes())

    @rule()
    def copy(self) -> None:
        self.bm = self.bm.copy()

    @precondition(lambda self: self.bm.nbits > 0)
    @rule(data=st.data(), value=st.booleans())
    def runs_equal_a_naive_scan(self, data: st.DataObject, value: bool) -> None:
        start, end = self._range(data)
        got = list(self.bm.runs(start, end, value))
        assert got == _coarse_runs(self.model, self.bm.nbits, start, end, value)

    @rule(data=st.data())
    def range_queries_equal_the_model(self, data: st.DataObject) -> None:
        start, end = self._range(data)
        n = (self.model >> start) & ((1 << (end - start)) - 1)
        assert self.bm.count_range(start, end) == n.bit_count()
        assert self.bm.all_set(start, end) == (n.bit_count() == end - start)
        assert self.bm.all_clear(start, end) == (n == 0)

    @invariant()
    def summary_agrees_with_a_recount(self) -> None:
        assert self.bm.group_counts() == _recount(self.bm, self.model)
        assert self.bm.count == self.model.bit_count()
        assert int.from_bytes(self.bm.to_bytes(), "little") == self.model


TestBitmapSummary = BitmapMachine.TestCase


def test_naive_runs_helpers_agree() -> None:
    model = (0b1011 << 60) | (((1 << 200) - 1) << 100)
    for value in (True, False):
        assert _naive_runs(model, 0, 400, value) == _coarse_runs(model, 400, 0, 400, value)


def test_runs_of_uniform_and_few_run_maps() -> None:
    nbits = 8 * GROUP_BITS + 100
    bm = Bitmap(nbits)
    assert list(bm.runs(0, nbits)) == []
    assert list(bm.runs(0, nbits, False)) == [(0, nbits)]
    bm.set_range(0, nbits)
    assert list(bm.runs(0, nbits)) == [(0, nbits)]
    assert list(bm.runs(5, nbits - 3)) == [(5, nbits - 3)]
    bm.clear_range(GROUP_BITS + 3, 2 * GROUP_BITS)
    bm.clear_range(4 * GROUP_BITS, 6 * GROUP_BITS)
    g = GROUP_BITS
    assert list(bm.runs(0, nbits)) == [(0, g + 3), (2 * g, 4 * g), (6 * g, nbits)]
    assert list(bm.runs(0, nbits, False)) == [(g + 3, 2 * g), (4 * g, 6 * g)]
    assert bm.group_counts()[-1] == 100


@pytest.mark.parametrize("nbits", [1, 60, 63, 64, 65, 4095, 4096, 4097, 3 * 4096 + 5])
def test_from_bytes_refuses_any_bit_beyond_the_size(nbits: int) -> None:
    data = bytearray(Bitmap(nbits).to_bytes())
    data[-1] |= 0x80  # the top bit of the last byte lies beyond nbits unless nbits % 8 == 0
    if nbits % 8 == 0:
        assert Bitmap.from_bytes(nbits, bytes(data)).count == 1
    else:
        with pytest.raises(ValueError, match="beyond its size"):
            Bitmap.from_bytes(nbits, bytes(data))


@pytest.mark.parametrize(
    "ranges",
    [
        # one transition inside each mixed group, on and off word boundaries
        [(3, 5 * GROUP_BITS + 64), (7 * GROUP_BITS + 1000, 9 * GROUP_BITS)],
        # a group whose count fits a single transition but whose bits do not
        [(10, 20), (30, GROUP_BITS)],
        [(GROUP_BITS + 100, GROUP_BITS + 164), (GROUP_BITS + 200, 2 * GROUP_BITS + 5)],
        # more candidate groups than the few-group path takes
        [(g * GROUP_BITS + 7, g * GROUP_BITS + 2000) for g in range(0, 80, 1)],
    ],
)
def test_runs_match_a_naive_scan_whatever_the_groups_hold(ranges: list[tuple[int, int]]) -> None:
    nbits = 81 * GROUP_BITS + 33
    bm = Bitmap(nbits)
    model = 0
    for start, end in ranges:
        bm.set_range(start, end)
        model |= ((1 << (end - start)) - 1) << start
    for start, end in ((0, nbits), (5, nbits - 7), (GROUP_BITS + 150, 3 * GROUP_BITS)):
        for value in (True, False):
            assert list(bm.runs(start, end, value)) == _naive_runs(model, start, end, value)
