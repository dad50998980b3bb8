"""The notification engine: discards reach every listener, populates roll back LIFO, and a
raising listener never leaves another listener's view different from the provider's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.errors import ListenerFailure
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.rdm import (
    AggregateManager,
    BlockStateManager,
    DiscardNotificationError,
    DiscardPolicy,
    RamDiscardListener,
)
from ramdiscard.units import GiB, KiB, MiB
from tests.consumers.vfio.conftest import IOURING_OK, IOURING_REASON, World, vm_pin
from tests.rdm.agg_helpers import make_region

PAGE = 4 * KiB
BS = 2 * MiB
ADDR = 4 * GiB


class Refused(Exception):
    """What a faulty listener raises."""


class View(RamDiscardListener):
    """Keeps the pages it was told are populated; records contract violations instead of
    raising (a raise would be a listener failure). ``fail_populate`` / ``fail_discard``
    are the 1-based call numbers at which it raises instead of acting."""

    def __init__(
        self,
        name: str,
        log: list[tuple[str, str, int, int]] | None = None,
        *,
        fail_populate: frozenset[int] = frozenset(),
        fail_discard: frozenset[int] = frozenset(),
        double: bool = False,
    ) -> None:
        self.name = name
        self.log = log if log is not None else []
        self.fail_populate = fail_populate
        self.fail_discard = fail_discard
        self.double_discard_supported = double
        self.populates = 0
        self.discards = 0
        self.pages: set[int] = set()
        self.violations: list[str] = []

    def __repr__(self) -> str:
        return f"<View {self.name}>"

    @property
    def faulty(self) -> bool:
        return bool(self.fail_populate or self.fail_discard)

    def notify_populate(self, section: MemoryRegionSection) -> None:
        self.populates += 1
        if self.populates in self.fail_populate:
            raise Refused(f"{self.name} refuses populate #{self.populates}")
        pages = _pages(section)
        if pages & self.pages:
            self.violations.append(f"populate of populated {section!r}")
        self.pages |= pages
        self.log.append((self.name, "populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.discards += 1
        if self.discards in self.fail_discard:
            raise Refused(f"{self.name} fails discard #{self.discards}")
        pages = _pages(section)
        if not self.double_discard_supported and not pages <= self.pages:
            self.violations.append(f"discard of unpopulated {section!r}")
        self.pages -= pages
        self.log.append((self.name, "discard", section.offset_within_region, section.size))


def _pages(section: MemoryRegionSection) -> set[int]:
    return set(range(section.offset_within_region // PAGE, -(-section.end // PAGE)))


def provider_pages(manager: Any, section: MemoryRegionSection) -> set[int]:
    out: set[int] = set()
    manager.replay_populated(section, lambda run: out.update(_pages(run)))
    return out


# -- the stale-pin regression -----------------------------------------------------------


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()


def test_discard_reaches_a_listener_registered_before_one_that_raises(world: World) -> None:
    dev = world.vmem(64 * MiB, "anonymous")
    whole = MemoryRegionSection(dev.region, 0, dev.region_size)
    good = View("good")
    bad = View("bad", fail_discard=frozenset(range(1, 100)))
    dev.register_listener(good, whole)  # registered first: notified after ``bad``
    dev.register_listener(bad, whole)
    assert dev.listeners == (bad, good)
    assert dev.plug(ADDR, 4) is ResponseType.ACK
    assert len(good.pages) * PAGE == 8 * MiB == dev.plugged_size
    assert dev.unplug(ADDR, 4) is ResponseType.ACK
    assert dev.plugged_size == 0
    assert good.pages == set()  # it heard of the discard although ``bad`` raised first
    assert good.violations == [] and bad.discards == 1


@pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)
def test_vfio_container_behind_a_raising_listener_keeps_no_pins(world: World) -> None:
    dev = world.vmem(64 * MiB, "anonymous")
    space = world.space(dev)
    backend = world.backend("iouring")
    c = world.container(backend)
    pin0 = vm_pin()
    c.attach(space)  # the container's RamDiscardListener is registered first
    bad = View("bad", fail_discard=frozenset(range(1, 100)))
    dev.register_listener(bad, MemoryRegionSection(dev.region, 0, dev.region_size))
    assert dev.plug(ADDR, 4) is ResponseType.ACK
    assert vm_pin() - pin0 == 8 * MiB == backend.pinned_bytes == c.mapped_bytes
    assert dev.unplug(ADDR, 4) is ResponseType.ACK
    assert c.mapped_bytes == 0 and backend.pin_count == 0
    assert vm_pin() == pin0  # nothing stays pinned on the discarded memory
    dev.unregister_listener(bad)


def test_unplug_all_reaches_every_listener_when_one_raises(world: World) -> None:
    dev = world.vmem(64 * MiB, "anonymous")
    whole = MemoryRegionSection(dev.region, 0, dev.region_size)
    good, double = View("good"), View("double", double=True)
    bad = View("bad", fail_discard=frozenset(range(1, 100)))
    for listener in (good, double, bad):
        dev.register_listener(listener, whole)
    assert dev.plug(ADDR, 3) is ResponseType.ACK
    assert dev.plug(ADDR + 16 * MiB, 2) is ResponseType.ACK
    assert dev.unplug_all() is ResponseType.ACK
    assert good.pages == double.pages == set() and dev.plugged_size == 0
    assert good.violations == double.violations == []


# -- engine rules through a BlockStateManager ---------------------------------------------


def block_manager(size: int = 1 * MiB, granularity: int = 64 * KiB) -> tuple[MemoryRegion, BlockStateManager]:
    mr = make_region(size)
    return mr, BlockStateManager(mr, granularity)


def test_populate_rollback_is_last_in_first_out() -> None:
    mr, m = block_manager()
    g = m.granularity
    m.set_populated(g, g)  # so that [0, 4g) is two discarded runs: [0, g) and [2g, 4g)
    log: list[tuple[str, str, int, int]] = []
    a, b = View("a", log), View("b", log)
    c = View("c", log, fail_populate=frozenset({3}))  # replay, run 1, refuses run 2
    for listener in (a, b, c):
        m.register_listener(listener, MemoryRegionSection(mr, 0, mr.size))
    log.clear()
    with pytest.raises(Refused):
        m.set_populated(0, 4 * g)
    told = [entry for entry in log if entry[1] == "populate"]
    undone = [entry for entry in log if entry[1] == "discard"]
    assert [(n, o, s) for n, _, o, s in undone] == [(n, o, s) for n, _, o, s in reversed(told)]
    assert told == [("c", "populate", 0, g), ("b", "populate", 0, g), ("a", "populate", 0, g)]
    assert m.populated_size == g
    for listener in (a, b, c):
        assert listener.pages == provider_pages(m, MemoryRegionSection(mr, 0, mr.size))


def test_set_discarded_tells_everyone_records_it_and_raises_the_failures_together() -> None:
    mr, m = block_manager()
    g = m.granularity
    whole = MemoryRegionSection(mr, 0, mr.size)
    first_bad = View("bad1", fail_discard=frozenset({1}))
    good = View("good")
    second_bad = View("bad2", fail_discard=frozenset({1, 2}))
    for listener in (good, first_bad, second_bad):
        m.register_listener(listener, whole)
    m.set_populated(0, 2 * g)
    m.set_populated(4 * g, g)
    with pytest.raises(DiscardNotificationError) as info:
        m.set_discarded(0, 8 * g)
    error = info.value
    assert isinstance(error, ListenerFailure) and isinstance(error, ExceptionGroup)
    assert [listener for listener, _, _ in error.failures] == [second_bad, first_bad, second_bad]
    assert all(isinstance(exc, Refused) for exc in error.exceptions)
    assert m.populated_size == 0 and good.pages == set() and good.violations == []
    assert first_bad.pages == set(range(2 * g // PAGE))  # it failed run 1, heard run 2


def test_unregister_unlinks_even_when_the_discard_raises() -> None:
    mr, m = block_manager()
    m.set_populated(0, m.granularity)
    bad = View("bad", fail_discard=frozenset({1}))
    m.register_listener(bad, MemoryRegionSection(mr, 0, mr.size))
    with pytest.raises(DiscardNotificationError):
        m.unregister_listener(bad)
    assert m.listeners == () and bad.manager is None and bad.section is None


def test_aggregate_add_source_discard_reaches_all_then_is_undone() -> None:
    mr = make_region(1 * MiB)
    a, b = BlockStateManager(mr, 64 * KiB), BlockStateManager(mr, 64 * KiB)
    a.set_populated(0, mr.size)
    agg = AggregateManager(mr)
    agg.add_source(a)
    whole = MemoryRegionSection(mr, 0, mr.size)
    good, bad = View("good"), View("bad", fail_discard=frozenset({1}))
    agg.register_listener(good, whole)
    agg.register_listener(bad, whole)
    with pytest.raises(DiscardNotificationError):
        agg.add_source(b)  # b hides everything: a discard that ``bad`` fails
    assert agg.sources == (a,) and b.sink is None
    assert good.pages == provider_pages(agg, whole) == _pages(whole) and good.violations == []
    assert good.discards == 1 and good.populates == 2  # replay, then the undo


# -- the property: a raising listener never skews another listener's view --------------------

N_BLOCKS = 16
G = 64 * KiB

ops = st.lists(
    st.tuples(
        st.sampled_from(["populate", "discard"]),
        st.integers(0, 1),  # which source (aggregate case)
        st.integers(0, N_BLOCKS - 1),
        st.integers(1, 6),
    ),
    min_size=1,
    max_size=25,
)
listener_specs = st.lists(
    st.tuples(
        st.frozensets(st.integers(1, 12), max_size=3),  # populate calls that raise
        st.frozensets(st.integers(1, 12), max_size=3),  # discard calls that raise
        st.integers(0, N_BLOCKS * G // PAGE - 1),  # section start page
        st.integers(1, N_BLOCKS * G // PAGE),  # section pages
        st.booleans(),  # double discard
    ),
    min_size=1,
    max_size=5,
)


@given(kind=st.sampled_from(["block", "aggregate"]), specs=listener_specs, steps=ops)
def test_raising_listeners_never_skew_the_others(
    kind: str, specs: list[tuple[frozenset[int], frozenset[int], int, int, bool]], steps: list[Any]
) -> None:
    mr = make_region(N_BLOCKS * G)
    sources = [BlockStateManager(mr, G)]
    manager: Any = sources[0]
    if kind == "aggregate":
        sources.append(BlockStateManager(mr, G))
        sources[1].set_populated(0, mr.size // 2)
        manager = AggregateManager(mr)
        for src in sources:
            manager.add_source(src)
    listeners: list[View] = []
    for i, (fail_p, fail_d, start, pages, double) in enumerate(specs):
        start_b = start * PAGE
        size = min(pages * PAGE, mr.size - start_b)
        listener = View(f"l{i}", fail_populate=fail_p, fail_discard=fail_d, double=double)
        try:
            manager.register_listener(listener, MemoryRegionSection(mr, start_b, size))
        except Refused:
            assert listener.manager is None and listener.pages == set()
            continue
        listeners.append(listener)
    for what, which, block, count in steps:
        src = sources[which % len(sources)]
        offset, size = block * G, min(count, N_BLOCKS - block) * G
        before = src.bitmap_bytes()
        if what == "populate":
            try:
                src.set_populated(offset, size)
            except Refused:
                assert src.bitmap_bytes() == before  # a refusal changes nothing
        else:
            try:
                src.set_discarded(offset, size)
            except DiscardNotificationError as exc:
                assert all(isinstance(e, Refused) for e in exc.exceptions)
            assert src.is_range_discarded(offset, size)  # recorded even when listeners raised
        for listener in listeners:
            if listener.faulty:
                continue
            assert listener.section is not None
            assert listener.pages == provider_pages(manager, listener.section), listener
            assert listener.violations == []
    for listener in listeners:
        try:
            manager.unregister_listener(listener)
        except DiscardNotificationError:
            assert listener.faulty
        if not listener.faulty:
            assert listener.pages == set()


@given(specs=listener_specs, steps=ops)
def test_raising_listeners_never_skew_the_others_on_virtio_mem(
    specs: list[tuple[frozenset[int], frozenset[int], int, int, bool]], steps: list[Any]
) -> None:
    w = World()
    try:
        dev = w.vmem(N_BLOCKS * BS, "fake", policy=DiscardPolicy())
        listeners: list[View] = []
        for i, (fail_p, fail_d, start, pages, double) in enumerate(specs):
            start_b = start * PAGE * (BS // G)
            size = min(pages * PAGE * (BS // G), dev.region_size - start_b)
            listener = View(f"l{i}", fail_populate=fail_p, fail_discard=fail_d, double=double)
            dev.register_listener(listener, MemoryRegionSection(dev.region, start_b, size))
            listeners.append(listener)
        for what, which, block, count in steps:
            n = min(count, N_BLOCKS - block)
            addr = ADDR + block * BS
            if which and what == "discard":
                dev.unplug_all()
            elif what == "populate":
                dev.plug(addr, n)
            else:
                dev.unplug(addr, n)
            assert dev.plugged_size == dev.populated_size
            for listener in listeners:
                if listener.faulty:
                    continue
                assert listener.section is not None
                assert listener.pages == provider_pages(dev, listener.section), listener
                assert listener.violations == []
        for listener in listeners:
            try:
                dev.unregister_listener(listener)
            except DiscardNotificationError:
                assert listener.faulty
    finally:
        w.close()
