"""RAM block registry and notifiers: events, replay, rollback, bad input."""

from __future__ import annotations

import gc
import logging

import pytest

from ramdiscard.errors import InvalidArgument, ListenerError, RegionMapped
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryRegion, transaction
from ramdiscard.ramblocks import (
    BlockRegistered,
    LiveBlock,
    RamBlockNotifier,
    RamBlockRegistry,
    default_registry,
)
from ramdiscard.rdm import BlockStateManager
from ramdiscard.units import MiB
from tests.conftest import FakeRam


class Recorder(RamBlockNotifier):
    def __init__(self, fail_on: str | None = None, fail_at: int = 1) -> None:
        self.events: list[tuple[object, ...]] = []
        self.fail_on = fail_on
        self.fail_at = fail_at
        self.seen = 0

    def _rec(self, event: str, block: LiveBlock, *args: int) -> None:
        if event == self.fail_on:
            self.seen += 1
            if self.seen == self.fail_at:
                raise RuntimeError(f"refused {event}")
        self.events.append((event, block.name, *args))

    def ram_block_added(self, block: LiveBlock) -> None:
        self._rec("added", block, block.size, block.max_size)

    def ram_block_removed(self, block: LiveBlock) -> None:
        self._rec("removed", block)

    def ram_block_resized(self, block: LiveBlock, old_size: int, new_size: int) -> None:
        self._rec("resized", block, old_size, new_size)

    def ram_block_mapped(self, block: LiveBlock) -> None:
        self._rec("mapped", block)

    def ram_block_unmapped(self, block: LiveBlock) -> None:
        self._rec("unmapped", block)

    def ram_block_manager_changed(self, block: LiveBlock) -> None:
        self._rec("manager", block, int(block.ram_discard_manager is not None))


def fake_region(name: str, size: int = 4 * MiB) -> MemoryRegion:
    return MemoryRegion.new_ram(name, FakeRam(size))


def test_new_ram_registers_with_the_default_registry() -> None:
    rec = Recorder()
    default_registry().add_notifier(rec)
    try:
        mr = fake_region("fresh")
        assert mr in default_registry()
        assert ("added", "fresh", 4 * MiB, 4 * MiB) in rec.events
    finally:
        default_registry().remove_notifier(rec)
    assert ("removed", "fresh") in rec.events


def test_registration_replays_existing_blocks_and_removal_unwinds_them() -> None:
    reg = RamBlockRegistry()
    a, b = fake_region("a"), fake_region("b", 8 * MiB)
    reg.add(a)
    reg.add(b)
    root = MemoryRegion.new_container("root", 1 << 32)
    root.add_subregion(0, b)
    space = AddressSpace("as", root)
    rec = Recorder()
    reg.add_notifier(rec)
    assert rec.events == [("added", "a", 4 * MiB, 4 * MiB), ("added", "b", 8 * MiB, 8 * MiB), ("mapped", "b")]
    rec.events.clear()
    reg.remove_notifier(rec)
    assert rec.events == [("unmapped", "b"), ("removed", "b"), ("removed", "a")]
    assert reg.notifiers == ()
    space.destroy()


def test_mapped_and_unmapped_follow_the_union_of_flat_views() -> None:
    reg = RamBlockRegistry()
    mr = fake_region("ram")
    reg.add(mr)
    rec = Recorder()
    reg.add_notifier(rec)
    root1 = MemoryRegion.new_container("r1", 1 << 32)
    root2 = MemoryRegion.new_container("r2", 1 << 32)
    s1, s2 = AddressSpace("one", root1), AddressSpace("two", root2)
    alias = MemoryRegion.new_alias("alias", mr, 0, 2 * MiB)
    root1.add_subregion(0, alias)  # through an alias: the RAM region appears
    root2.add_subregion(0, mr)  # a second view: no new event
    root1.del_subregion(alias)  # still in view two: no event
    root2.set_enabled(True)
    mr.set_enabled(False)  # gone from every view
    mr.set_enabled(True)
    s2.destroy()  # destroying the last space that maps it
    assert [e[0] for e in rec.events[1:]] == ["mapped", "unmapped", "mapped", "unmapped"]
    s1.destroy()
    reg.remove_notifier(rec)


def test_a_transaction_reports_only_the_net_change() -> None:
    reg = RamBlockRegistry()
    mr = fake_region("ram")
    reg.add(mr)
    root = MemoryRegion.new_container("root", 1 << 32)
    space = AddressSpace("as", root)
    rec = Recorder()
    reg.add_notifier(rec)
    with transaction():
        root.add_subregion(0, mr)
        root.del_subregion(mr)
        root.add_subregion(1 << 20, mr)
    assert [e[0] for e in rec.events] == ["added", "mapped"]
    with transaction():
        root.del_subregion(mr)
        root.add_subregion(0, mr)
    assert [e[0] for e in rec.events] == ["added", "mapped"]
    space.destroy()
    reg.remove_notifier(rec)


def test_new_address_space_maps_its_regions() -> None:
    reg = RamBlockRegistry()
    mr = fake_region("ram")
    reg.add(mr)
    root = MemoryRegion.new_container("root", 1 << 32)
    root.add_subregion(0, mr)
    rec = Recorder()
    reg.add_notifier(rec)
    assert [e[0] for e in rec.events] == ["added"]
    space = AddressSpace("as", root)
    assert rec.events[-1] == ("mapped", "ram")
    space.destroy()
    assert rec.events[-1] == ("unmapped", "ram")
    reg.remove_notifier(rec)


def test_manager_changes_are_reported_after_they_take_effect() -> None:
    reg = RamBlockRegistry()
    mr = fake_region("ram")
    reg.add(mr)
    rec = Recorder()
    reg.add_notifier(rec)
    bsm = BlockStateManager(mr, 2 * MiB)
    mr.set_ram_discard_manager(bsm)
    mr.set_ram_discard_manager(None)
    assert rec.events[1:] == [("manager", "ram", 1), ("manager", "ram", 0)]
    reg.remove_notifier(rec)


def test_resize_of_a_real_block_is_reported() -> None:
    reg = RamBlockRegistry()
    with RamBlock(2 * MiB, thp=False, max_size=8 * MiB) as block:
        mr = MemoryRegion.new_ram("resizable", block)
        reg.add(mr)
        rec = Recorder()
        reg.add_notifier(rec)
        block.resize(6 * MiB)
        block.resize(4 * MiB)
        assert rec.events == [
            ("added", "resizable", 2 * MiB, 8 * MiB),
            ("resized", "resizable", 2 * MiB, 6 * MiB),
            ("resized", "resizable", 6 * MiB, 4 * MiB),
        ]
        reg.remove(mr)
        block.resize(2 * MiB)  # the registry's hook is gone with the block
        assert rec.events[-1] == ("removed", "resizable")
        reg.remove_notifier(rec)


def test_bad_input_is_refused_with_nothing_changed() -> None:
    reg = RamBlockRegistry()
    mr = fake_region("ram")
    reg.add(mr)
    with pytest.raises(BlockRegistered, match="already registered"):
        reg.add(mr)
    with pytest.raises(InvalidArgument, match="not a RAM region"):
        reg.add(MemoryRegion.new_container("c", 4096))
    with pytest.raises(InvalidArgument, match="not registered"):
        reg.remove(fake_region("other"))
    rec = Recorder()
    reg.add_notifier(rec)
    with pytest.raises(ListenerError, match="already registered"):
        reg.add_notifier(rec)
    root = MemoryRegion.new_container("root", 1 << 32)
    root.add_subregion(0, mr)
    space = AddressSpace("as", root)
    with pytest.raises(RegionMapped, match="cannot be removed"):
        reg.remove(mr)
    assert mr in reg
    reg.remove_notifier(rec)
    with pytest.raises(ListenerError, match="not registered"):
        reg.remove_notifier(rec)
    space.destroy()


def test_a_refused_replay_is_rolled_back() -> None:
    reg = RamBlockRegistry()
    regions = [fake_region(f"r{i}") for i in range(3)]
    for mr in regions:
        reg.add(mr)
    root = MemoryRegion.new_container("root", 1 << 32)
    root.add_subregion(0, regions[0])
    space = AddressSpace("as", root)
    rec = Recorder(fail_on="added", fail_at=3)
    with pytest.raises(RuntimeError, match="refused added"):
        reg.add_notifier(rec)
    assert rec.events == [
        ("added", "r0", 4 * MiB, 4 * MiB),
        ("mapped", "r0"),
        ("added", "r1", 4 * MiB, 4 * MiB),
        ("removed", "r1"),
        ("unmapped", "r0"),
        ("removed", "r0"),
    ]
    assert reg.notifiers == ()
    space.destroy()


def test_a_raising_notifier_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    reg = RamBlockRegistry()
    bad, good = Recorder(fail_on="added"), Recorder()
    reg.add_notifier(bad)
    reg.add_notifier(good)
    with caplog.at_level(logging.ERROR, logger="ramdiscard.ramblocks"):
        mr = fake_region("late")
        reg.add(mr)
    assert good.events == [("added", "late", 4 * MiB, 4 * MiB)]
    assert "refused added" in caplog.text
    reg.remove_notifier(bad)
    reg.remove_notifier(good)


def test_registry_holds_regions_weakly() -> None:
    reg = RamBlockRegistry()
    reg.add(fake_region("ephemeral"))
    gc.collect()
    assert [b.name for b in reg.blocks()] == []
