"""Type1 v2 semantics of VfioContainer.dma_map / dma_unmap (NullDmaBackend: bookkeeping
pins), including a model-based test of random map/unmap sequences."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ramdiscard import faults
from ramdiscard.consumers.vfio import (
    MappingConflict,
    MappingLimitError,
    NullDmaBackend,
    UnmapSplitError,
    VfioContainer,
)
from ramdiscard.errors import InvalidArgument

P = 4096
HOST = 0x7F0000000000


def make(limit: int = 65535) -> tuple[VfioContainer, NullDmaBackend]:
    b = NullDmaBackend()
    return VfioContainer(b, max_mappings=limit), b


def test_map_and_unmap_whole_mappings_with_holes() -> None:
    c, b = make()
    c.dma_map(0x10000, HOST, 2 * P)
    c.dma_map(0x20000, HOST + 0x10000, P, readonly=True)
    c.dma_map(0x30000, HOST + 0x20000, 3 * P)
    assert c.mapping_count == 3 and c.mapped_bytes == 6 * P and b.pinned_bytes == 6 * P
    assert [(m.iova, m.size, m.readonly) for m in c.mappings()] == [
        (0x10000, 2 * P, False),
        (0x20000, P, True),
        (0x30000, 3 * P, False),
    ]
    assert c.dma_unmap(0x1000, 0x8000) == 0  # covers nothing: fine, nothing removed
    assert c.dma_unmap(0x10000, 0x20000 - 0x10000 + P) == 3 * P  # two mappings + hole
    assert [m.iova for m in c.mappings()] == [0x30000]
    assert c.dma_unmap(0, 1 << 40) == 3 * P
    assert c.mapping_count == 0 and b.pin_count == 0


@pytest.mark.parametrize(
    ("iova", "size"),
    [(0x10000 + P, P), (0x10000, P), (0x10000 + P, 4 * P), (0xF000, 2 * P)],
    ids=["inside", "head", "tail", "straddles-start"],
)
def test_unmap_that_cuts_a_mapping_is_refused_and_removes_nothing(iova: int, size: int) -> None:
    c, b = make()
    c.dma_map(0x8000, HOST, P)
    c.dma_map(0x10000, HOST + P, 3 * P)
    before = c.mappings()
    with pytest.raises(UnmapSplitError, match="split"):
        c.dma_unmap(iova, size)
    assert c.mappings() == before and b.pin_count == 2


@pytest.mark.parametrize(("iova", "size"), [(0x10000, P), (0xF000, 2 * P), (0x11000, 5 * P), (0, 1 << 20)])
def test_overlapping_map_is_refused(iova: int, size: int) -> None:
    c, b = make()
    c.dma_map(0x10000, HOST, 2 * P)
    with pytest.raises(MappingConflict):
        c.dma_map(iova, HOST + 0x100000, size)
    assert c.mapping_count == 1 and b.pin_count == 1


def test_mapping_limit_maps_nothing_more() -> None:
    c, b = make(limit=3)
    for i in range(3):
        c.dma_map(i * P, HOST + i * P, P)
    with pytest.raises(MappingLimitError, match="limit"):
        c.dma_map(10 * P, HOST, P)
    assert c.mapping_count == 3 and b.pin_count == 3
    c.dma_unmap(0, P)
    c.dma_map(10 * P, HOST, P)
    assert c.mapping_count == 3


@pytest.mark.parametrize(
    ("iova", "host", "size"),
    [
        (1, HOST, P),
        (0, HOST + 1, P),
        (0, HOST, P + 1),
        (0, HOST, 0),
        (-P, HOST, P),
        (0, 0, P),
        (True, HOST, P),
    ],
)
def test_bad_map_arguments(iova: int, host: int, size: int) -> None:
    c, b = make()
    with pytest.raises(InvalidArgument):
        c.dma_map(iova, host, size)
    assert c.mapping_count == 0 and b.pin_count == 0


def test_failed_pin_or_unpin_changes_nothing() -> None:
    from ramdiscard.consumers.dma import IoUringDmaBackend, iouring_available

    if not iouring_available()[0]:
        pytest.skip(iouring_available()[1])
    import mmap

    m = mmap.mmap(-1, 4 * P)
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    with IoUringDmaBackend(slots_per_ring=16) as b:
        c = VfioContainer(b)
        with faults.inject(faults.Op.PIN, nth=1), pytest.raises(faults.InjectedFault):
            c.dma_map(0, addr, 4 * P)
        assert c.mapping_count == 0 and b.pin_count == 0
        c.dma_map(0, addr, 4 * P)
        with faults.inject(faults.Op.UNPIN, nth=1), pytest.raises(faults.InjectedFault):
            c.dma_unmap(0, 4 * P)
        assert c.mapping_count == 1 and b.pin_count == 1  # still mapped, retry works
        assert c.dma_unmap(0, 4 * P) == 4 * P and b.pin_count == 0
    m.close()


class Type1Model(RuleBasedStateMachine):
    """Random map/unmap sequences against a dict model of the kernel's rules."""

    def __init__(self) -> None:
        super().__init__()
        self.backend = NullDmaBackend()
        self.limit = 12
        self.c = VfioContainer(self.backend, max_mappings=self.limit)
        self.model: dict[int, int] = {}  # iova page -> size in pages

    @rule(start=st.integers(0, 63), pages=st.integers(1, 8))
    def map(self, start: int, pages: int) -> None:
        end = start + pages
        overlaps = any(s < end and start < s + n for s, n in self.model.items())
        full = len(self.model) >= self.limit
        try:
            self.c.dma_map(start * P, HOST + start * P, pages * P)
        except MappingLimitError:
            assert full
            return
        except MappingConflict:
            assert overlaps and not full
            return
        assert not overlaps and not full
        self.model[start] = pages

    @rule(start=st.integers(0, 70), pages=st.integers(1, 20))
    def unmap(self, start: int, pages: int) -> None:
        end = start + pages
        cut = any(s < start < s + n or s < end < s + n for s, n in self.model.items())
        inside = [s for s, n in self.model.items() if start <= s and s + n <= end]
        try:
            removed = self.c.dma_unmap(start * P, pages * P)
        except UnmapSplitError:
            assert cut
            return
        assert not cut
        assert removed == sum(self.model[s] for s in inside) * P
        for s in inside:
            del self.model[s]

    @invariant()
    def matches_model(self) -> None:
        got = [(m.iova // P, m.size // P, m.host_address) for m in self.c.mappings()]
        assert got == [(s, n, HOST + s * P) for s, n in sorted(self.model.items())]
        assert self.c.mapping_count == len(self.model) == self.backend.pin_count
        assert self.c.mapped_bytes == sum(self.model.values()) * P == self.backend.pinned_bytes


TestType1Model = Type1Model.TestCase
