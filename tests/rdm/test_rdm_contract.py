"""The RamDiscardManager contract, through BlockStateManager and the public API."""

from __future__ import annotations

import pytest

from ramdiscard import (
    AddressSpace,
    BlockStateManager,
    DiscardPolicy,
    DiscardPolicyError,
    InvalidArgument,
    ListenerError,
    ManagerBusy,
    MemoryRegion,
    MemoryRegionSection,
    RamDiscardListener,
    RamDiscardManager,
    RegionMapped,
)
from tests.conftest import FakeRam

K4 = 4096
MiB = 1 << 20


class Rec(RamDiscardListener):
    def __init__(self, name: str = "", refuse_at: int | None = None, double: bool = False) -> None:
        self.name = name
        self.log: list[tuple[str, int, int]] = []
        self.refuse_at = refuse_at
        self.populates = 0
        self.double_discard_supported = double

    def notify_populate(self, section: MemoryRegionSection) -> None:
        self.populates += 1
        if self.refuse_at is not None and self.populates == self.refuse_at:
            raise RuntimeError(f"{self.name} refuses")
        self.log.append(("populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.log.append(("discard", section.offset_within_region, section.size))


def make(size: int = 1 * MiB, gran: int = K4) -> tuple[MemoryRegion, BlockStateManager]:
    mr = MemoryRegion.new_ram("ram", FakeRam(size))
    return mr, BlockStateManager(mr, gran)


def whole(mr: MemoryRegion) -> MemoryRegionSection:
    return MemoryRegionSection(mr, 0, mr.size)


def test_is_a_ram_discard_manager_with_granularity() -> None:
    mr, m = make()
    assert isinstance(m, RamDiscardManager)
    assert m.get_min_granularity(mr) == K4
    with pytest.raises(InvalidArgument):
        m.get_min_granularity(MemoryRegion.new_ram("other", FakeRam(MiB)))


def test_replay_is_maximal_ascending_and_clipped() -> None:
    mr, m = make()
    m.set_populated(0, 3 * K4)
    m.set_populated(3 * K4, 2 * K4)  # adjacent: must merge with the first run
    m.set_populated(10 * K4, K4)
    m.set_populated(20 * K4, 4 * K4)
    got: list[tuple[int, int, int]] = []
    section = MemoryRegionSection(mr, K4 + 100, 21 * K4, 0x1000_0000)
    m.replay_populated(
        section, lambda s: got.append((s.offset_within_region, s.size, s.offset_within_address_space))
    )
    base = 0x1000_0000 - (K4 + 100)
    assert got == [
        (K4 + 100, 5 * K4 - (K4 + 100), base + K4 + 100),
        (10 * K4, K4, base + 10 * K4),
        (20 * K4, 22 * K4 + 100 - 20 * K4, base + 20 * K4),
    ]
    holes: list[tuple[int, int]] = []
    m.replay_discarded(
        MemoryRegionSection(mr, 0, 12 * K4), lambda s: holes.append((s.offset_within_region, s.size))
    )
    assert holes == [(5 * K4, 5 * K4), (11 * K4, K4)]


def test_replay_stops_at_and_propagates_first_exception() -> None:
    mr, m = make()
    for i in range(0, 10, 2):
        m.set_populated(i * K4, K4)
    seen: list[int] = []

    def fn(s: MemoryRegionSection) -> None:
        seen.append(s.offset_within_region)
        if len(seen) == 2:
            raise KeyError("stop")

    with pytest.raises(KeyError):
        m.replay_populated(whole(mr), fn)
    assert seen == [0, 2 * K4]


def test_is_populated_widens_and_empty_is_false() -> None:
    mr, m = make()
    m.set_populated(K4, K4)
    assert m.is_populated(MemoryRegionSection(mr, K4 + 10, 100))
    assert not m.is_populated(MemoryRegionSection(mr, K4 + 10, K4))
    assert not m.is_populated(MemoryRegionSection(mr, K4, 0))


def test_newest_listener_first_and_rollback_order() -> None:
    mr, m = make()
    a, b, c = Rec("a"), Rec("b", refuse_at=1), Rec("c")
    for listener in (a, b, c):
        m.register_listener(listener, whole(mr))
    assert m.listeners == (c, b, a)
    with pytest.raises(RuntimeError, match="b refuses"):
        m.set_populated(0, 2 * K4)
    assert c.log == [("populate", 0, 2 * K4), ("discard", 0, 2 * K4)]
    assert b.log == []
    assert a.log == []  # never told
    assert m.populated_size == 0
    m.set_populated(0, 2 * K4)  # b accepts its second populate
    assert all(listener.log[-1] == ("populate", 0, 2 * K4) for listener in (a, b, c))


def test_populate_notifies_only_discarded_runs_and_discard_only_populated() -> None:
    mr, m = make()
    r = Rec()
    m.register_listener(r, whole(mr))
    m.set_populated(2 * K4, K4)
    r.log.clear()
    m.set_populated(0, 4 * K4)
    assert r.log == [("populate", 0, 2 * K4), ("populate", 3 * K4, K4)]
    r.log.clear()
    m.set_discarded(3 * K4, 4 * K4)
    assert r.log == [("discard", 3 * K4, K4)]


def test_multi_run_populate_rolls_back_all_runs() -> None:
    mr, m = make()
    m.set_populated(K4, K4)
    a, b = Rec("a"), Rec("b", refuse_at=3)  # replay, first run, then refuses the second
    m.register_listener(a, whole(mr))
    m.register_listener(b, whole(mr))
    a.log.clear()
    b.log.clear()
    with pytest.raises(RuntimeError):
        m.set_populated(0, 4 * K4)  # runs [0,1) and [2,4); b refuses the second
    assert m.populated_size == K4
    assert a.log == [("populate", 0, K4), ("discard", 0, K4)]
    assert b.log == [("populate", 0, K4), ("discard", 0, K4)]


def test_register_replays_and_unregister_discards() -> None:
    mr, m = make()
    m.set_populated(0, K4)
    m.set_populated(4 * K4, 2 * K4)
    plain, double = Rec(), Rec(double=True)
    sec = MemoryRegionSection(mr, 0, 8 * K4)
    m.register_listener(plain, sec)
    m.register_listener(double, sec)
    assert plain.log == double.log == [("populate", 0, K4), ("populate", 4 * K4, 2 * K4)]
    m.unregister_listener(plain)
    m.unregister_listener(double)
    assert plain.log[2:] == [("discard", 0, K4), ("discard", 4 * K4, 2 * K4)]
    assert double.log[2:] == [("discard", 0, 8 * K4)]  # one whole-section discard
    assert plain.section is None and plain.manager is None


def test_register_refusal_rolls_back_and_leaves_unregistered() -> None:
    mr, m = make()
    for i in (0, 2, 4):
        m.set_populated(i * K4, K4)
    r = Rec(refuse_at=3)
    with pytest.raises(RuntimeError):
        m.register_listener(r, whole(mr))
    assert r.log == [
        ("populate", 0, K4),
        ("populate", 2 * K4, K4),
        ("discard", 2 * K4, K4),
        ("discard", 0, K4),
    ]
    assert m.listeners == () and r.section is None
    m.register_listener(Rec(), whole(mr))


def test_bad_input_changes_nothing() -> None:
    mr, m = make()
    other = MemoryRegion.new_ram("other", FakeRam(MiB))
    r = Rec()
    with pytest.raises(InvalidArgument):
        m.register_listener(r, whole(other))
    with pytest.raises(InvalidArgument):
        m.register_listener(r, MemoryRegionSection(mr, 0, 2 * MiB))
    with pytest.raises(InvalidArgument):
        m.is_populated(whole(other))
    for off, size in ((1, K4), (0, K4 + 1), (-K4, K4), (0, 0), (MiB, K4), (0, -K4)):
        with pytest.raises(InvalidArgument):
            m.set_populated(off, size)
    m.register_listener(r, whole(mr))
    with pytest.raises(ListenerError):
        m.register_listener(r, whole(mr))
    with pytest.raises(ListenerError):
        m.unregister_listener(Rec())
    assert m.populated_size == 0 and m.listeners == (r,)
    with pytest.raises(InvalidArgument):
        BlockStateManager(mr, 3000)
    with pytest.raises(InvalidArgument):
        BlockStateManager(MemoryRegion.new_container("c", MiB), K4)


def test_state_change_from_inside_notification_is_refused() -> None:
    mr, m = make()

    class Reentrant(RamDiscardListener):
        error: Exception | None = None
        queried = False

        def notify_populate(self, section: MemoryRegionSection) -> None:
            self.queried = m.is_populated(section) is False  # queries are fine
            try:
                m.set_discarded(0, K4)
            except ListenerError as e:
                self.error = e

    r = Reentrant()
    m.register_listener(r, whole(mr))
    m.set_populated(0, K4)
    assert r.queried and isinstance(r.error, ListenerError)


def test_one_manager_per_region_and_ram_only() -> None:
    mr, m = make()
    mr.set_ram_discard_manager(m)
    assert mr.ram_discard_manager is m
    with pytest.raises(ManagerBusy):
        mr.set_ram_discard_manager(BlockStateManager(mr, K4))
    with pytest.raises(ManagerBusy):
        mr.set_ram_discard_manager(m)
    _, other = make()
    with pytest.raises(InvalidArgument):
        mr.set_ram_discard_manager(None) or mr.set_ram_discard_manager(other)
    mr.set_ram_discard_manager(None)
    assert mr.ram_discard_manager is None
    assert MemoryRegion.new_container("c", MiB).ram_discard_manager is None
    with pytest.raises(InvalidArgument):
        MemoryRegion.new_container("c", MiB).set_ram_discard_manager(m)


@pytest.mark.parametrize("via_alias", [False, True])
def test_manager_cannot_change_while_mapped(via_alias: bool) -> None:
    mr, m = make()
    root = MemoryRegion.new_container("root", 16 * MiB)
    child = MemoryRegion.new_alias("alias", mr, 0, mr.size) if via_alias else mr
    root.add_subregion(0, child)
    as_ = AddressSpace("mem", root)
    with pytest.raises(RegionMapped):
        mr.set_ram_discard_manager(m)
    assert mr.ram_discard_manager is None
    root.del_subregion(child)
    mr.set_ram_discard_manager(m)
    root.add_subregion(0, child)
    with pytest.raises(RegionMapped):
        mr.set_ram_discard_manager(None)
    assert mr.ram_discard_manager is m
    as_.destroy()
    mr.set_ram_discard_manager(None)


CONFLICTS = {
    "disable": {"require", "coordinated_require"},
    "uncoordinated_disable": {"require"},
    "require": {"disable", "uncoordinated_disable"},
    "coordinated_require": {"disable"},
}


@pytest.mark.parametrize("held", sorted(CONFLICTS))
@pytest.mark.parametrize("wanted", sorted(CONFLICTS))
def test_policy_conflicts(held: str, wanted: str) -> None:
    p = DiscardPolicy()
    getattr(p, held)(True)
    before = p.snapshot()
    if held in CONFLICTS[wanted]:
        with pytest.raises(DiscardPolicyError):
            getattr(p, wanted)(True)
        assert p.snapshot() == before
    else:
        getattr(p, wanted)(True)
        getattr(p, wanted)(False)
    getattr(p, held)(False)
    assert p.snapshot() == DiscardPolicy().snapshot()
    with pytest.raises(DiscardPolicyError):
        getattr(p, held)(False)


def test_policy_queries() -> None:
    p = DiscardPolicy()
    assert not p.is_disabled() and not p.is_required()
    with p.holding("uncoordinated-disable"):
        assert p.is_disabled()
        p.coordinated_require(True)  # virtio-mem and vfio type1 coexist
        assert p.is_required()
        p.coordinated_require(False)
    assert not p.is_disabled()
