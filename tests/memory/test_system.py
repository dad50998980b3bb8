"""MemorySystem: two machines in one process share no topology, registry or policy; the
default system keeps single-machine code working without any context argument."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest

from ramdiscard import transaction
from ramdiscard.consumers.vfio import NullDmaBackend, VfioContainer
from ramdiscard.errors import DiscardPolicyError, InvalidArgument
from ramdiscard.hostmem import RamBlock
from ramdiscard.machine import Machine, parse_scenario
from ramdiscard.memory import (
    AddressSpace,
    MemoryListener,
    MemoryRegion,
    MemoryRegionSection,
    MemorySystem,
    default_system,
)
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.ramblocks import LiveBlock, RamBlockNotifier, default_registry, registry_of
from ramdiscard.rdm import default_policy, policy_of
from ramdiscard.units import GiB, MiB

BS = 2 * MiB
SIZE = 32 * MiB
ADDR = 4 * GiB


class Counting(MemoryListener):
    def __init__(self) -> None:
        self.adds: list[MemoryRegionSection] = []
        self.dels: list[MemoryRegionSection] = []

    def region_add(self, section: MemoryRegionSection) -> None:
        self.adds.append(section)

    def region_del(self, section: MemoryRegionSection) -> None:
        self.dels.append(section)


class Added(RamBlockNotifier):
    def __init__(self) -> None:
        self.names: list[str] = []

    def ram_block_added(self, block: LiveBlock) -> None:
        self.names.append(block.name)


@dataclass
class Side:
    system: MemorySystem
    root: MemoryRegion
    space: AddressSpace
    ram: MemoryRegion
    listener: Counting
    container: VfioContainer
    device: VirtioMem | None = None
    extras: list[MemoryRegion] = field(default_factory=list)


@pytest.fixture
def two() -> Iterator[tuple[Side, Side]]:
    """System A: plain RAM pinned whole by an uncoordinated vfio container (no manager).
    System B: virtio-mem with a coordinated vfio container."""
    with ExitStack() as stack:
        a_sys, b_sys = MemorySystem("a"), MemorySystem("b")
        a_block = stack.enter_context(RamBlock(SIZE, name="a-ram"))
        b_block = stack.enter_context(RamBlock(SIZE, name="b-ram"))

        a_ram = MemoryRegion.new_ram("a-ram", a_block, system=a_sys)
        a_root = MemoryRegion.new_container("a-root", ADDR + 2 * SIZE, system=a_sys)
        a_root.add_subregion(0, a_ram)
        a_space = AddressSpace("a-memory", a_root)
        a_listener = Counting()
        a_space.register_listener(a_listener)
        a_backend = NullDmaBackend()
        stack.callback(a_backend.close)
        a_container = VfioContainer(a_backend, coordinate_discards=False)
        a_container.attach(a_space)
        stack.callback(a_container.close)

        b_ram = MemoryRegion.new_ram("b-ram", b_block, system=b_sys)
        dev = VirtioMem(b_ram, addr=ADDR, block_size=BS, requested_size=SIZE)
        stack.callback(dev.unrealize)
        b_root = MemoryRegion.new_container("b-root", ADDR + 2 * SIZE)
        b_root.add_subregion(ADDR, dev.device_region)
        stack.callback(b_root.del_subregion, dev.device_region)
        b_space = AddressSpace("b-memory", b_root)
        stack.callback(b_space.destroy)
        b_listener = Counting()
        b_space.register_listener(b_listener)
        b_backend = NullDmaBackend()
        stack.callback(b_backend.close)
        b_container = VfioContainer(b_backend)
        b_container.attach(b_space)
        stack.callback(b_container.close)

        yield (
            Side(a_sys, a_root, a_space, a_ram, a_listener, a_container),
            Side(b_sys, b_root, b_space, b_ram, b_listener, b_container, dev),
        )


def test_both_machines_work_with_conflicting_consumers(two: tuple[Side, Side]) -> None:
    a, b = two
    assert b.device is not None
    # A pins everything without a manager ("discards disabled"), B needs coordinated
    # discards: on one shared policy the second of these would have been refused.
    assert policy_of(a.system).snapshot().disable == 1
    assert policy_of(b.system).snapshot().coordinated_require == 1
    assert policy_of(b.system).snapshot().disable == 0
    assert policy_of(a.system).snapshot().coordinated_require == 0
    assert a.container.mapped_bytes == SIZE
    assert b.container.mapped_bytes == 0

    assert b.device.plug(ADDR, 4) is ResponseType.ACK
    assert b.container.mapped_bytes == 4 * BS
    assert b.device.unplug(ADDR, 2) is ResponseType.ACK
    assert b.container.mapped_bytes == 2 * BS
    assert a.container.mapped_bytes == SIZE


def test_regions_spaces_and_registries_belong_to_their_system(two: tuple[Side, Side]) -> None:
    a, b = two
    assert a.ram.system is a.system and a.space.system is a.system
    assert b.root.system is b.system and b.space.system is b.system  # inherited from its subregion
    assert a.system.live_spaces() == [a.space]
    assert b.system.live_spaces() == [b.space]
    assert a.space not in default_system().live_spaces()
    assert [blk.region for blk in registry_of(a.system).blocks()] == [a.ram]
    assert [blk.region for blk in registry_of(b.system).blocks()] == [b.ram]
    assert a.ram not in default_registry() and b.ram not in default_registry()

    watcher = Added()
    registry_of(b.system).add_notifier(watcher)
    try:
        assert watcher.names == ["b-ram"]
        with RamBlock(4 * MiB, name="a-late") as block:
            late = MemoryRegion.new_ram("a-late", block, system=a.system)
            assert watcher.names == ["b-ram"]  # B's registry never hears of A's blocks
            assert late in registry_of(a.system)
    finally:
        registry_of(b.system).remove_notifier(watcher)


def test_a_topology_change_rerenders_only_its_own_system(two: tuple[Side, Side]) -> None:
    a, b = two
    a_before, b_before = len(a.listener.adds), len(b.listener.adds)
    with RamBlock(4 * MiB, name="extra") as block_a, RamBlock(4 * MiB, name="extra-b") as block_b:
        extra_a = MemoryRegion.new_ram("extra-a", block_a, system=a.system)
        extra_b = MemoryRegion.new_ram("extra-b", block_b, system=b.system)
        with b.system.transaction():
            b.root.add_subregion(0, extra_b)
            # A is not inside B's transaction: its change renders at once ...
            a.root.add_subregion(ADDR + SIZE, extra_a)
            assert [s.mr for s in a.listener.adds[a_before:]] == [extra_a]
            # ... and B's pending change is not rendered by A's commit.
            assert len(b.listener.adds) == b_before
            assert not b.space.maps(extra_b)
        assert [s.mr for s in b.listener.adds[b_before:]] == [extra_b]
        assert [s.mr for s in a.listener.adds[a_before:]] == [extra_a]
        a.root.del_subregion(extra_a)
        b.root.del_subregion(extra_b)
        assert [s.mr for s in a.listener.dels] == [extra_a]
        assert [s.mr for s in b.listener.dels] == [extra_b]


def test_regions_of_two_systems_cannot_be_combined(two: tuple[Side, Side]) -> None:
    a, b = two
    with RamBlock(4 * MiB, name="stray") as block:
        stray = MemoryRegion.new_ram("stray", block, system=a.system)
        with pytest.raises(InvalidArgument, match=r"'stray' belongs to memory system 'a', 'b-root' to 'b'"):
            b.root.add_subregion(0, stray)
        assert stray.container is None and stray not in b.root.subregions
        assert len(b.listener.adds) == len(b.space.flatview())
        alias = MemoryRegion.new_alias("stray-alias", stray, 0, MiB)
        with pytest.raises(InvalidArgument, match="regions of two systems cannot be combined"):
            b.root.add_subregion(0, alias)
        with pytest.raises(InvalidArgument, match="belongs to memory system 'a'"):
            registry_of(b.system).add(stray)


def test_a_policy_forbidding_discards_in_one_system_leaves_the_other_alone() -> None:
    a_sys, b_sys = MemorySystem("a"), MemorySystem("b")
    with RamBlock(SIZE, name="a") as a_block, RamBlock(SIZE, name="b") as b_block:
        a_ram = MemoryRegion.new_ram("a-ram", a_block, system=a_sys)
        b_ram = MemoryRegion.new_ram("b-ram", b_block, system=b_sys)
        policy_of(a_sys).disable(True)
        try:
            with pytest.raises(DiscardPolicyError, match="Discarding RAM is disabled"):
                VirtioMem(a_ram, addr=ADDR, block_size=BS)
            assert a_ram.ram_discard_manager is None
            dev = VirtioMem(b_ram, addr=ADDR, block_size=BS)
            try:
                assert b_ram.ram_discard_manager is dev
                assert policy_of(b_sys).snapshot().coordinated_require == 1
                assert default_policy().snapshot().disable == 0
                assert default_policy().snapshot().coordinated_require == 0
            finally:
                dev.unrealize()
            assert policy_of(b_sys).snapshot().coordinated_require == 0
        finally:
            policy_of(a_sys).disable(False)


def test_default_system_keeps_the_context_free_api() -> None:
    watcher = Added()
    default_registry().add_notifier(watcher)
    try:
        mr = MemoryRegion.new_ram("default-ram", 4 * MiB)
        assert mr.system is default_system()
        assert mr in default_registry() and watcher.names[-1] == "default-ram"
        root = MemoryRegion.new_container("default-root", 8 * MiB)
        space = AddressSpace("default-memory", root)
        try:
            assert space.system is default_system() and space in default_system().live_spaces()
            listener = Counting()
            space.register_listener(listener)
            with transaction():
                root.add_subregion(0, mr)
                assert listener.adds == []
            assert [s.mr for s in listener.adds] == [mr]
            backend = NullDmaBackend()
            container = VfioContainer(backend)
            try:
                container.attach(space)
                assert container.policy is default_policy()
                assert default_policy().snapshot().uncoordinated_disable >= 1
                assert container.mapped_bytes == 4 * MiB
            finally:
                container.close()
                backend.close()
            root.del_subregion(mr)
        finally:
            space.destroy()
    finally:
        default_registry().remove_notifier(watcher)
    assert mr.ram is not None


SCENARIO_A = """
boot-ram = "32M"
[[devices]]
id = "vmem0"
size = "256M"
[[consumers]]
type = "vfio"
backend = "null"
coordinate-discards = false
"""

SCENARIO_B = """
boot-ram = "32M"
[[devices]]
id = "vmem0"
size = "256M"
[[consumers]]
type = "vfio"
backend = "null"
"""


def test_two_machines_in_one_process_are_independent() -> None:
    with (
        Machine.from_scenario(parse_scenario(SCENARIO_A)) as ma,
        Machine.from_scenario(parse_scenario(SCENARIO_B)) as mb,
    ):
        assert ma.system is not mb.system
        assert ma.policy is not mb.policy and mb.policy is policy_of(mb.system)
        assert ma.system.live_spaces() == [ma.space] and mb.system.live_spaces() == [mb.space]
        assert [b.name for b in ma.registry.blocks()] == ["pc.ram", "vmem0-mem"]
        assert [b.name for b in mb.registry.blocks()] == ["pc.ram", "vmem0-mem"]
        a_regions = {id(b.region) for b in ma.registry.blocks()}
        assert a_regions.isdisjoint(id(b.region) for b in mb.registry.blocks())
        assert not any(b.region in default_registry() for b in ma.registry.blocks() + mb.registry.blocks())
        whole = 32 * MiB + 256 * MiB  # A pins boot RAM and the whole device region, unplugged or not
        assert ma.status()["pinned"] == whole
        mb.set_requested_size("vmem0", 128 * MiB)
        mb.run_guest()
        assert mb.status()["plugged"] == 128 * MiB
        assert mb.status()["pinned"] == 32 * MiB + 128 * MiB
        assert ma.status()["plugged"] == 0 and ma.status()["pinned"] == whole
        assert ma.uncoordinated_policy.snapshot().disable == 1
        assert mb.uncoordinated_policy.snapshot().disable == 0
        assert ma.policy.snapshot().coordinated_require == mb.policy.snapshot().coordinated_require == 1
        ma.set_requested_size("vmem0", 128 * MiB)
        ma.run_guest()
        assert ma.status()["plugged"] == 128 * MiB and ma.status()["pinned"] == whole
        assert mb.status()["plugged"] == 128 * MiB
