"""Flat view rendering and memory-listener notifications."""

from __future__ import annotations

import pytest

from ramdiscard import (
    AddressSpace,
    InvalidArgument,
    ListenerError,
    MemoryListener,
    MemoryRegion,
    MemoryRegionSection,
    TopologyError,
    transaction,
)
from tests.conftest import FakeRam

MiB = 1 << 20


def ram(name: str, size: int) -> MemoryRegion:
    return MemoryRegion.new_ram(name, FakeRam(size))


class Recorder(MemoryListener):
    def __init__(self) -> None:
        self.events: list[tuple[str, MemoryRegionSection]] = []

    def region_add(self, section: MemoryRegionSection) -> None:
        self.events.append(("add", section))

    def region_del(self, section: MemoryRegionSection) -> None:
        self.events.append(("del", section))


def spans(as_: AddressSpace) -> list[tuple[str, int, int, int]]:
    return [
        (s.mr.name, s.offset_within_address_space, s.size, s.offset_within_region) for s in as_.flatview()
    ]


def test_sorted_non_overlapping_and_container_has_no_background() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    a, b = ram("a", 8 * MiB), ram("b", 4 * MiB)
    root.add_subregion(32 * MiB, a)
    root.add_subregion(0, b)
    as_ = AddressSpace("mem", root)
    assert spans(as_) == [("b", 0, 4 * MiB, 0), ("a", 32 * MiB, 8 * MiB, 0)]


def test_higher_priority_wins_and_equal_priority_last_added_wins() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    low, high, late = ram("low", 16 * MiB), ram("high", 4 * MiB), ram("late", 2 * MiB)
    root.add_subregion(0, low, priority=0)
    root.add_subregion(4 * MiB, high, priority=1)
    as_ = AddressSpace("mem", root)
    assert spans(as_) == [
        ("low", 0, 4 * MiB, 0),
        ("high", 4 * MiB, 4 * MiB, 0),
        ("low", 8 * MiB, 8 * MiB, 8 * MiB),
    ]
    root.add_subregion(1 * MiB, late, priority=0)
    assert spans(as_)[:3] == [
        ("low", 0, 1 * MiB, 0),
        ("late", 1 * MiB, 2 * MiB, 0),
        ("low", 3 * MiB, 1 * MiB, 3 * MiB),
    ]


def test_alias_resolves_to_target_and_clips() -> None:
    backing = ram("backing", 16 * MiB)
    root = MemoryRegion.new_container("root", 64 * MiB)
    alias = MemoryRegion.new_alias("win", backing, 4 * MiB, 8 * MiB)
    root.add_subregion(60 * MiB, alias)  # only 4 MiB fit in the container
    as_ = AddressSpace("mem", root)
    assert spans(as_) == [("backing", 60 * MiB, 4 * MiB, 4 * MiB)]


def test_adjacent_aliases_merge_unless_unmergeable() -> None:
    backing = ram("backing", 8 * MiB)
    for unmergeable, expected in ((False, 1), (True, 2)):
        root = MemoryRegion.new_container("root", 8 * MiB)
        root.add_subregion(0, MemoryRegion.new_alias("s0", backing, 0, 4 * MiB, unmergeable=unmergeable))
        root.add_subregion(
            4 * MiB, MemoryRegion.new_alias("s1", backing, 4 * MiB, 4 * MiB, unmergeable=unmergeable)
        )
        as_ = AddressSpace("mem", root)
        assert len(as_.flatview()) == expected
        as_.destroy()


def test_listener_sees_exactly_the_changed_sections() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    a, b = ram("a", 8 * MiB), ram("b", 8 * MiB)
    root.add_subregion(0, a)
    as_ = AddressSpace("mem", root)
    rec = Recorder()
    as_.register_listener(rec)
    assert [(k, s.mr.name) for k, s in rec.events] == [("add", "a")]
    rec.events.clear()
    root.add_subregion(16 * MiB, b)
    assert [(k, s.mr.name) for k, s in rec.events] == [("add", "b")]
    rec.events.clear()
    b.set_enabled(False)
    assert [(k, s.mr.name) for k, s in rec.events] == [("del", "b")]
    rec.events.clear()
    as_.unregister_listener(rec)
    assert [(k, s.mr.name) for k, s in rec.events] == [("del", "a")]


def test_transaction_batches_to_the_net_change() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    a, b = ram("a", 8 * MiB), ram("b", 8 * MiB)
    as_ = AddressSpace("mem", root)
    rec = Recorder()
    as_.register_listener(rec)
    with transaction():
        root.add_subregion(0, a)
        root.add_subregion(8 * MiB, b)
        root.del_subregion(a)
        assert rec.events == []
    assert [(k, s.mr.name) for k, s in rec.events] == [("add", "b")]


def test_register_listener_rolls_back_when_region_add_fails() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    root.add_subregion(0, ram("a", 4 * MiB))
    root.add_subregion(8 * MiB, ram("b", 4 * MiB))
    as_ = AddressSpace("mem", root)

    class Picky(Recorder):
        def region_add(self, section: MemoryRegionSection) -> None:
            if section.mr.name == "b":
                raise RuntimeError("no")
            super().region_add(section)

    p = Picky()
    with pytest.raises(RuntimeError):
        as_.register_listener(p)
    assert [(k, s.mr.name) for k, s in p.events] == [("add", "a"), ("del", "a")]
    assert as_.listeners == ()
    ok = Recorder()
    as_.register_listener(ok)
    with pytest.raises(ListenerError):
        as_.register_listener(ok)


def test_listener_failure_during_topology_change_is_reported_but_change_applies() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    as_ = AddressSpace("mem", root)

    class Bad(MemoryListener):
        def region_add(self, section: MemoryRegionSection) -> None:
            raise RuntimeError("bad listener")

    good = Recorder()
    as_.register_listener(Bad())
    as_.register_listener(good)
    with pytest.raises(TopologyError):
        root.add_subregion(0, ram("a", 4 * MiB))
    assert [s.mr.name for s in as_.flatview()] == ["a"]
    assert [k for k, _ in good.events] == ["add"]


def test_tree_rules() -> None:
    root = MemoryRegion.new_container("root", 64 * MiB)
    a = ram("a", 4 * MiB)
    root.add_subregion(0, a)
    other = MemoryRegion.new_container("other", 64 * MiB)
    with pytest.raises(InvalidArgument):
        other.add_subregion(0, a)  # already has a parent
    with pytest.raises(InvalidArgument):
        a.add_subregion(0, root)  # cycle
    with pytest.raises(InvalidArgument):
        other.del_subregion(a)
    with pytest.raises(InvalidArgument):
        MemoryRegion.new_alias("x", a, 2 * MiB, 4 * MiB)
    with pytest.raises(InvalidArgument):
        root.add_subregion(-1, ram("n", 4096))


def test_section_intersect() -> None:
    mr = ram("r", 16 * MiB)
    s = MemoryRegionSection(mr, 4 * MiB, 8 * MiB, 0x1_0000_0000, readonly=True)
    part = s.intersect(6 * MiB, 100 * MiB)
    assert part == MemoryRegionSection(mr, 6 * MiB, 6 * MiB, 0x1_0000_0000 + 2 * MiB, readonly=True)
    assert s.intersect(0, 4 * MiB) is None
    assert s.intersect(12 * MiB, 1) is None
    assert s.intersect(0, 100 * MiB) == s
    with pytest.raises(ValueError):
        MemoryRegionSection(mr, -1, 4)
