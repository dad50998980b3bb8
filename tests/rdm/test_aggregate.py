"""AggregateManager: the 2026 RFC's unit cases (tests/unit/test-ram-discard-manager.c)."""

from __future__ import annotations

import pytest

from ramdiscard.errors import InvalidArgument, ListenerError, ManagerBusy, RegionMapped
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.rdm import (
    AggregateManager,
    SourceNotFound,
    add_ram_discard_source,
    remove_ram_discard_source,
)
from ramdiscard.units import MiB
from tests.rdm.agg_helpers import LARGE, REGION_SIZE, SMALL, Recorder, Source, make_region, pages_of, section


def agg_with(mr: MemoryRegion, *sources: Source) -> AggregateManager:
    agg = AggregateManager(mr)
    for s in sources:
        agg.add_source(s)
    return agg


def populated(agg: AggregateManager, offset: int = 0, size: int | None = None) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    agg.replay_populated(
        section(agg.region, offset, size), lambda s: runs.append((s.offset_within_region, s.end))
    )
    return runs


def discarded(agg: AggregateManager, offset: int = 0, size: int | None = None) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    agg.replay_discarded(
        section(agg.region, offset, size), lambda s: runs.append((s.offset_within_region, s.end))
    )
    return runs


def test_single_source_queries() -> None:
    mr = make_region()
    src = Source(mr, SMALL)
    agg = agg_with(mr, src)
    assert agg.get_min_granularity(mr) == SMALL
    assert not agg.is_populated(section(mr, 0, SMALL))
    src.set_populated(4 * SMALL, 2 * SMALL)
    assert agg.is_populated(section(mr, 4 * SMALL, 2 * SMALL))
    assert not agg.is_populated(section(mr, 3 * SMALL, 2 * SMALL))
    assert populated(agg) == [(4 * SMALL, 6 * SMALL)]
    assert discarded(agg) == [(0, 4 * SMALL), (6 * SMALL, REGION_SIZE)]


def test_single_source_register_unregister() -> None:
    mr = make_region()
    src = Source(mr, SMALL)
    agg = agg_with(mr, src)
    src.set_populated(0, 8 * SMALL)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    assert rec.populates == 1 and rec.view == set(range(8))
    assert rec.manager is agg and agg.listeners == (rec,)
    src.set_populated(16 * SMALL, SMALL)
    assert rec.populates == 2
    agg.unregister_listener(rec)
    assert rec.view == set() and rec.discards == 2 and rec.section is None


def test_two_sources_same_granularity() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a, b)
    assert agg.get_min_granularity(mr) == SMALL
    a.set_populated(0, 8 * SMALL)
    b.set_populated(4 * SMALL, 8 * SMALL)
    assert populated(agg) == [(4 * SMALL, 8 * SMALL)]
    assert agg.is_populated(section(mr, 4 * SMALL, 4 * SMALL))
    assert not agg.is_populated(section(mr, 0, 8 * SMALL))


def test_two_sources_different_granularity() -> None:
    mr = make_region()
    fine, coarse = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, coarse, fine)
    assert agg.get_min_granularity(mr) == SMALL
    coarse.set_populated(0, LARGE)
    fine.set_populated(LARGE - SMALL, 2 * SMALL)
    assert populated(agg) == [(LARGE - SMALL, LARGE)]
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    assert rec.view == {LARGE // SMALL - 1}


def test_aggregated_notifications_populate_only_when_all_populated() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, a, b)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    a.set_populated(0, 4 * SMALL)
    assert rec.populates == 0
    b.set_populated(0, LARGE)
    assert rec.log == [("populate", 0, 4 * SMALL)]
    a.set_populated(8 * SMALL, 4 * SMALL)
    assert rec.log[-1] == ("populate", 8 * SMALL, 4 * SMALL)
    b.set_discarded(0, LARGE)
    assert rec.log[-2:] == [("discard", 0, 4 * SMALL), ("discard", 8 * SMALL, 4 * SMALL)]
    assert rec.view == set()


def test_add_remove_readd_source_with_listener() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a)
    a.set_populated(0, 8 * SMALL)
    b.set_populated(2 * SMALL, 2 * SMALL)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    assert rec.view == set(range(8))
    agg.add_source(b)
    assert rec.view == {2, 3}
    assert rec.log[1:] == [("discard", 0, 2 * SMALL), ("discard", 4 * SMALL, 4 * SMALL)]
    assert b.sink is agg
    agg.remove_source(b)
    assert rec.view == set(range(8)) and b.sink is None
    agg.add_source(b)
    assert rec.view == {2, 3}
    assert agg.sources == (a, b)


def test_duplicate_add_and_unknown_remove_change_nothing() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    with pytest.raises(ManagerBusy):
        agg.add_source(a)
    with pytest.raises(SourceNotFound):
        agg.remove_source(b)
    assert agg.sources == (a,) and rec.log == [] and b.sink is None
    other = AggregateManager(mr)
    with pytest.raises(ManagerBusy):
        other.add_source(a)
    with pytest.raises(InvalidArgument):
        agg.add_source(Source(make_region(), SMALL))


def test_populate_rollback() -> None:
    mr = make_region()
    src = Source(mr, SMALL)
    agg = agg_with(mr, src)
    refusing = Recorder(fail_from=1)
    first = Recorder()
    agg.register_listener(refusing, section(mr))
    agg.register_listener(first, section(mr))  # newest: notified first
    with pytest.raises(OSError):
        src.set_populated(0, 4 * SMALL)
    assert (first.populates, first.discards) == (1, 1)
    assert first.view == set() and not src.is_range_populated(0, 4 * SMALL)
    assert populated(agg) == []


def test_populate_rollback_across_runs_and_sources() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a, b)
    b.set_populated(0, 2 * SMALL)
    b.set_populated(4 * SMALL, 2 * SMALL)
    rec = Recorder(fail_from=2)
    agg.register_listener(rec, section(mr))
    with pytest.raises(OSError):
        a.set_populated(0, 8 * SMALL)
    assert rec.view == set() and rec.log == [("populate", 0, 2 * SMALL), ("discard", 0, 2 * SMALL)]
    assert a.populated_size == 0


def test_replay_intersection_with_section() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, a, b)
    a.set_populated(0, 3 * MiB)
    b.set_populated(LARGE, LARGE)
    assert populated(agg) == [(LARGE, 3 * MiB)]
    assert populated(agg, LARGE + SMALL, SMALL) == [(LARGE + SMALL, LARGE + 2 * SMALL)]
    seen: list[int] = []
    agg.replay_populated(
        section(mr, LARGE, 2 * SMALL, gpa=0x1000_0000), lambda s: seen.append(s.offset_within_address_space)
    )
    assert seen == [0x1000_0000]


def test_no_sources_everything_populated() -> None:
    mr = make_region()
    agg = AggregateManager(mr)
    assert agg.is_populated(section(mr))
    assert populated(agg) == [(0, REGION_SIZE)]
    assert discarded(agg) == []
    assert agg.get_min_granularity(mr) == mr.ram.page_size  # type: ignore[union-attr]
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    assert len(rec.view) == REGION_SIZE // SMALL
    src = Source(mr, LARGE)
    agg.add_source(src)
    assert rec.view == set()
    agg.remove_source(src)
    assert len(rec.view) == REGION_SIZE // SMALL


def test_redundant_discard_sends_nothing() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a, b)
    a.set_populated(0, 4 * SMALL)
    b.set_populated(0, 4 * SMALL)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    a.set_discarded(0, 4 * SMALL)
    assert rec.discards == 1
    b.set_discarded(0, 4 * SMALL)
    assert rec.discards == 1 and rec.view == set()


def test_partial_multiple_and_overlapping_sections() -> None:
    mr = make_region()
    src = Source(mr, SMALL)
    agg = agg_with(mr, src)
    one = Recorder()
    two = Recorder()
    three = Recorder()
    agg.register_listener(one, section(mr, 0, 8 * SMALL))
    agg.register_listener(two, section(mr, 4 * SMALL, 8 * SMALL))
    agg.register_listener(three, section(mr, 6 * SMALL + 100, 2 * SMALL))
    src.set_populated(2 * SMALL, 8 * SMALL)
    assert one.view == set(range(2, 8))
    assert two.view == set(range(4, 10))
    assert three.log == [("populate", 6 * SMALL + 100, 2 * SMALL)]
    src.set_discarded(0, 16 * SMALL)
    assert one.view == two.view == three.view == set()


def test_region_boundary_sections() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, a, b)
    head = Recorder()
    tail = Recorder()
    agg.register_listener(head, section(mr, 0, SMALL))
    agg.register_listener(tail, section(mr, REGION_SIZE - SMALL, SMALL))
    a.set_populated(0, REGION_SIZE)
    b.set_populated(0, REGION_SIZE)
    assert head.log == [("populate", 0, SMALL)]
    assert tail.log == [("populate", REGION_SIZE - SMALL, SMALL)]
    with pytest.raises(InvalidArgument):
        agg.register_listener(Recorder(), section(mr, REGION_SIZE - SMALL, 2 * SMALL))
    assert populated(agg, REGION_SIZE - SMALL, SMALL) == [(REGION_SIZE - SMALL, REGION_SIZE)]


def test_replay_discarded_several_sources() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, a, b)
    a.set_populated(0, LARGE + 4 * SMALL)
    b.set_populated(0, 2 * LARGE)
    assert discarded(agg) == [(LARGE + 4 * SMALL, REGION_SIZE)]
    a.set_discarded(SMALL, SMALL)
    assert discarded(agg, 0, LARGE) == [(SMALL, 2 * SMALL)]
    assert pages_of(discarded(agg)) | pages_of(populated(agg)) == set(range(REGION_SIZE // SMALL))


def test_remove_source_refused_keeps_it() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, SMALL)
    agg = agg_with(mr, a, b)
    a.set_populated(0, 4 * SMALL)
    ok = Recorder()
    refusing = Recorder(fail_from=1)
    agg.register_listener(refusing, section(mr))
    agg.register_listener(ok, section(mr))
    with pytest.raises(OSError):
        agg.remove_source(b)
    assert agg.sources == (a, b) and b.sink is agg
    assert ok.view == set() and ok.log == [("populate", 0, 4 * SMALL), ("discard", 0, 4 * SMALL)]


def test_discard_all_through_aggregate() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    agg = agg_with(mr, a, b)
    a.set_populated(0, LARGE)
    b.set_populated(0, LARGE)
    plain = Recorder()
    double = Recorder(double=True)
    agg.register_listener(plain, section(mr))
    agg.register_listener(double, section(mr, 0, 2 * LARGE))
    with a.lock:
        a._discard_all_blocks()
    assert plain.log[-1] == ("discard", 0, LARGE)
    assert double.log[-1] == ("discard", 0, 2 * LARGE)
    with b.lock:
        b._discard_all_blocks()  # nothing populated in aggregate any more
    assert plain.discards == 1 and double.discards == 1


def test_attached_source_refuses_direct_listeners_and_nested_changes() -> None:
    mr = make_region()
    a = Source(mr, SMALL)
    agg = agg_with(mr, a)
    with pytest.raises(ListenerError):
        a.register_listener(Recorder(), section(mr))
    assert a.lock is agg.lock

    class Nested(Recorder):
        def notify_populate(self, s):  # type: ignore[no-untyped-def]
            super().notify_populate(s)
            with pytest.raises(ListenerError):
                a.set_discarded(0, SMALL)

    agg.register_listener(Nested(), section(mr))
    a.set_populated(0, SMALL)
    assert a.is_range_populated(0, SMALL)


def test_source_with_listeners_cannot_join() -> None:
    mr = make_region()
    a = Source(mr, SMALL)
    a.register_listener(Recorder(), section(mr))
    with pytest.raises(ManagerBusy):
        AggregateManager(mr).add_source(a)


def test_region_helpers() -> None:
    mr = make_region()
    a, b = Source(mr, SMALL), Source(mr, LARGE)
    assert add_ram_discard_source(mr, a) is a
    assert mr.ram_discard_manager is a
    with pytest.raises(ManagerBusy):
        add_ram_discard_source(mr, a)
    agg = add_ram_discard_source(mr, b)
    assert isinstance(agg, AggregateManager) and mr.ram_discard_manager is agg
    assert agg.sources == (a, b)
    remove_ram_discard_source(mr, a)
    assert mr.ram_discard_manager is b and b.sink is None and agg.sources == ()
    with pytest.raises(SourceNotFound):
        remove_ram_discard_source(mr, a)
    agg = add_ram_discard_source(mr, a)
    rec = Recorder()
    agg.register_listener(rec, section(mr))
    remove_ram_discard_source(mr, a)  # a listener keeps the aggregate in place
    assert mr.ram_discard_manager is agg and agg.sources == (b,)
    agg.unregister_listener(rec)
    remove_ram_discard_source(mr, b)
    assert mr.ram_discard_manager is None
    with pytest.raises(SourceNotFound):
        remove_ram_discard_source(mr, b)


def test_region_helpers_respect_not_while_mapped() -> None:
    mr = make_region()
    a, b, c = Source(mr, SMALL), Source(mr, SMALL), Source(mr, SMALL)
    add_ram_discard_source(mr, a)
    root = MemoryRegion.new_container("root", 1 << 32)
    root.add_subregion(0x1000_0000, mr)
    space = AddressSpace("as", root)
    try:
        with pytest.raises(RegionMapped):
            add_ram_discard_source(mr, b)
        assert mr.ram_discard_manager is a and a.sink is None and b.sink is None
        with pytest.raises(RegionMapped):
            remove_ram_discard_source(mr, a)
        root.del_subregion(mr)
        agg = add_ram_discard_source(mr, b)
        root.add_subregion(0x1000_0000, mr)
        # The manager object stays the same while mapped, so sources may come and go.
        add_ram_discard_source(mr, c)
        remove_ram_discard_source(mr, c)
        remove_ram_discard_source(mr, a)
        remove_ram_discard_source(mr, b)
        assert mr.ram_discard_manager is agg and agg.sources == ()
    finally:
        space.destroy()
