"""RamBlockDmaMapper on real memory: VmPin follows plain RAM + plugged virtio-mem memory."""

from __future__ import annotations

import pytest

from ramdiscard import faults
from ramdiscard.consumers.blockdma import MappingMode, RamBlockDmaMapper
from ramdiscard.consumers.dma import NullDmaBackend
from ramdiscard.errors import DiscardPolicyError, InvalidArgument
from ramdiscard.faults import Op
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem.wire import ResponseType
from ramdiscard.rdm import BlockStateManager
from ramdiscard.units import MiB
from tests.consumers.blockdma.conftest import BS, Rig, plug, unplug

PLAIN = 16 * MiB
VMEM = 64 * MiB


def check(rig: Rig, mapper: RamBlockDmaMapper, expected: int) -> int:
    """Mapper, backend and kernel agree that ``expected`` bytes are pinned."""
    assert mapper.pinned_bytes == expected
    assert rig.backend.pinned_bytes == expected
    assert rig.vm_pin() == expected
    return expected


STEPS = [("plug", 0, 8 * MiB), ("plug", 20 * MiB, 6 * MiB), ("unplug", 2 * MiB, 4 * MiB),
         ("plug", 62 * MiB, 2 * MiB), ("unplug", 0, 2 * MiB), ("unplug", 20 * MiB, 6 * MiB),
         ("unplug", 6 * MiB, 2 * MiB), ("unplug", 62 * MiB, 2 * MiB)]  # fmt: skip


@pytest.mark.parametrize("dynamic", [False, True], ids=["one-memslot", "dynamic-memslots"])
@pytest.mark.parametrize("attach_at", [0, 2, 4], ids=["before", "after-2", "after-4"])
def test_vmpin_is_plain_ram_plus_plugged_after_every_step(rig: Rig, attach_at: int, dynamic: bool) -> None:
    plain = rig.ram("plain", PLAIN)
    dev = rig.vmem(VMEM, dynamic=dynamic)
    mapper = None
    figures = []
    for i, (op, offset, size) in enumerate(STEPS):
        if i == attach_at:
            mapper = rig.mapper()
            figures.append(check(rig, mapper, PLAIN + dev.plugged_size))
        (plug if op == "plug" else unplug)(dev, offset, size)
        if mapper is not None:
            figures.append(check(rig, mapper, PLAIN + dev.plugged_size))
    assert mapper is not None
    assert mapper.block(plain).mode is MappingMode.WHOLE
    assert dev.plugged_size == 0
    # With dynamic memslots nothing is mapped once everything is unplugged: parked.
    assert mapper.block(dev.region).mode is (MappingMode.PARKED if dynamic else MappingMode.LISTENER)
    print(f"VmPin per step ({'dynamic' if dynamic else 'one memslot'}, attached at {attach_at}):",
          [f // MiB for f in figures], "MiB")  # fmt: skip
    mapper.close()
    check(rig, mapper, 0)
    assert rig.policy.snapshot().uncoordinated_disable == 0


def test_pins_are_granules_and_dma_reads_guest_memory(rig: Rig) -> None:
    plain = rig.ram("plain", PLAIN)
    dev = rig.vmem(VMEM)
    mapper = rig.mapper()
    plug(dev, 4 * MiB, 6 * MiB)
    status = mapper.block(dev.region)
    assert (status.pins, status.pinned_bytes) == (3, 6 * MiB)
    dev.ram.write(5 * MiB, b"plugged")  # type: ignore[attr-defined]
    plain.ram.write(PLAIN - 4, b"tail")  # type: ignore[union-attr]
    assert mapper.dma_read(mapper.iova_of(dev.region, 5 * MiB), 7) == b"plugged"
    assert mapper.dma_read(mapper.iova_of(plain, PLAIN - 4), 4) == b"tail"
    unplug(dev, 4 * MiB, 2 * MiB)
    with pytest.raises(InvalidArgument, match="IOMMU fault"):
        mapper.dma_read(mapper.iova_of(dev.region, 5 * MiB), 7)
    with pytest.raises(InvalidArgument, match="IOMMU fault"):  # a read across two granules
        mapper.dma_read(mapper.iova_of(dev.region, 8 * MiB - 4), 8)
    check(rig, mapper, PLAIN + 4 * MiB)


def test_block_removal_unmaps_it_and_frees_its_iova(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    extra = rig.ram("extra", 8 * MiB, map_at=1 << 30)
    mapper = rig.mapper()
    extra_iova = mapper.iova_of(extra)
    check(rig, mapper, PLAIN + 8 * MiB)
    rig.root.del_subregion(extra)
    check(rig, mapper, PLAIN + 8 * MiB)  # unmapped from the guest, still a RAM block
    rig.registry.remove(extra)
    check(rig, mapper, PLAIN)
    with pytest.raises(InvalidArgument, match="not followed"):
        mapper.block(extra)
    later = rig.ram("later", 4 * MiB, map_at=None)
    assert mapper.iova_of(later) == extra_iova  # first fit reuses the freed range
    check(rig, mapper, PLAIN + 4 * MiB)


def test_removing_a_virtio_mem_block(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    dev = rig.vmem(VMEM)
    mapper = rig.mapper()
    plug(dev, 0, 10 * MiB)
    check(rig, mapper, PLAIN + 10 * MiB)
    rig.root.del_subregion(dev.device_region)  # unmapped: listener gone, nothing pinned
    assert mapper.block(dev.region).mode is MappingMode.PARKED
    check(rig, mapper, PLAIN)
    dev.unrealize()  # possible only because the mapper's listener is gone
    rig.registry.remove(dev.region)
    check(rig, mapper, PLAIN)
    assert len(mapper.blocks()) == 1


def test_resize_of_a_whole_block(rig: Rig) -> None:
    mr = rig.ram("acpi", 4 * MiB, max_size=32 * MiB)
    mapper = rig.mapper()
    iova = mapper.iova_of(mr)
    assert mapper.block(mr).iova_size == 32 * MiB
    ram = mr.ram
    for size in (10 * MiB, 32 * MiB, 6 * MiB, 2 * MiB, 12 * MiB):
        ram.resize(size)  # type: ignore[union-attr]
        check(rig, mapper, size)
        assert mapper.iova_of(mr) == iova
    ram.write(11 * MiB, b"grown")  # type: ignore[union-attr]
    assert mapper.dma_read(iova + 11 * MiB, 5) == b"grown"


def test_resize_of_a_managed_block_re_registers_its_listener(rig: Rig) -> None:
    mr = rig.ram("managed", 16 * MiB, max_size=16 * MiB)
    rig.root.del_subregion(mr)
    bsm = BlockStateManager(mr, BS)
    mr.set_ram_discard_manager(bsm)
    rig.root.add_subregion(0, mr)
    mapper = rig.mapper()
    bsm.set_populated(0, 4 * MiB)
    bsm.set_populated(12 * MiB, 4 * MiB)
    check(rig, mapper, 8 * MiB)
    mr.ram.resize(8 * MiB)  # type: ignore[union-attr]
    check(rig, mapper, 4 * MiB)  # the populated granules beyond the used length are gone
    mr.ram.resize(16 * MiB)  # type: ignore[union-attr]
    check(rig, mapper, 8 * MiB)  # back in the listener's section, still populated per the manager
    rig.root.del_subregion(mr)
    mr.set_ram_discard_manager(None)


def test_manager_set_while_pinned_whole_never_leaves_a_stale_pin(rig: Rig) -> None:
    plain = rig.ram("plain", PLAIN)
    mem = rig.ram("vmem-mem", VMEM, map_at=None)
    mapper = rig.mapper()
    check(rig, mapper, PLAIN + VMEM)  # a block without manager: pinned whole, like nvme://
    from ramdiscard.providers.virtio_mem import VirtioMem

    dev = VirtioMem(mem, addr=1 << 32, block_size=BS, policy=rig.policy)
    rig.devices.append(dev)
    # The mapper let go when virtio-mem became the manager, before it discarded the block.
    assert mapper.block(mem).mode is MappingMode.PARKED
    check(rig, mapper, PLAIN)
    assert mem.ram.resident_bytes() == 0  # type: ignore[union-attr]
    rig.root.add_subregion(1 << 32, dev.device_region)
    plug(dev, 0, 4 * MiB)
    check(rig, mapper, PLAIN + 4 * MiB)
    unplug(dev, 0, 4 * MiB)
    rig.root.del_subregion(dev.device_region)
    dev.unrealize()
    assert mapper.block(mem).mode is MappingMode.WHOLE  # no manager any more: whole again
    check(rig, mapper, PLAIN + VMEM)
    assert mapper.block(plain).mode is MappingMode.WHOLE


def test_coordinated_mapper_runs_beside_virtio_mem(rig: Rig) -> None:
    dev = rig.vmem(VMEM)
    mapper = rig.mapper()  # coordinate_discards=True: only Du
    snap = rig.policy.snapshot()
    assert (snap.coordinated_require, snap.uncoordinated_disable, snap.disable) == (1, 1, 0)
    plug(dev, 0, 2 * MiB)
    check(rig, mapper, 2 * MiB)


def test_uncoordinated_mapper_conflicts_with_virtio_mem_either_way(rig: Rig) -> None:
    from ramdiscard.providers.virtio_mem import VirtioMem

    rig.ram("plain", PLAIN)
    mapper = rig.mapper(coordinate_discards=False)  # nvme:// today: disable-all
    assert rig.policy.snapshot().disable == 1
    mem = rig.ram("vmem-mem", VMEM, map_at=None)
    check(rig, mapper, PLAIN + VMEM)
    with pytest.raises(DiscardPolicyError, match="Discarding RAM is disabled"):
        VirtioMem(mem, addr=1 << 32, block_size=BS, policy=rig.policy)
    assert mem.ram_discard_manager is None
    mapper.close()
    check(rig, mapper, 0)

    dev = VirtioMem(mem, addr=1 << 32, block_size=BS, policy=rig.policy)
    rig.devices.append(dev)
    with pytest.raises(DiscardPolicyError, match="Cannot disable discarding of RAM"):
        rig.mapper(coordinate_discards=False)
    assert rig.policy.snapshot().disable == 0
    assert rig.backend.pinned_bytes == 0
    assert rig.registry.notifiers == ()


def test_uncoordinated_mapper_pins_managed_blocks_whole() -> None:
    from ramdiscard.ramblocks import RamBlockRegistry
    from ramdiscard.rdm import DiscardPolicy
    from tests.conftest import FakeRam

    registry, policy = RamBlockRegistry(), DiscardPolicy()
    mr = MemoryRegion.new_ram("managed", FakeRam(8 * MiB))
    registry.add(mr)
    mr.set_ram_discard_manager(BlockStateManager(mr, BS))
    with (
        NullDmaBackend() as backend,
        RamBlockDmaMapper(backend, coordinate_discards=False, policy=policy, registry=registry) as mapper,
    ):
        assert mapper.block(mr).mode is MappingMode.WHOLE
        assert backend.pinned_bytes == 8 * MiB


def test_pin_failure_during_replay_leaves_nothing_pinned(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    rig.ram("plain2", 4 * MiB, map_at=1 << 30)
    dev = rig.vmem(VMEM)
    plug(dev, 0, 6 * MiB)
    plug(dev, 30 * MiB, 4 * MiB)
    with faults.counting() as log:
        rig.mapper().close()
    pins = log.counts[Op.PIN]
    assert pins >= 7  # two whole blocks + five granules (io_uring may split a pin further)
    for nth in range(1, pins + 1):
        with faults.inject(Op.PIN, nth=nth) as plan, pytest.raises(faults.InjectedFault):
            rig.mapper()
        assert plan.fired == 1
        assert rig.backend.pinned_bytes == 0 and rig.vm_pin() == 0
        assert rig.registry.notifiers == ()
        assert dev.listeners == ()
        assert rig.policy.snapshot().uncoordinated_disable == 0
    mapper = rig.mapper()
    check(rig, mapper, PLAIN + 4 * MiB + 10 * MiB)


def test_pin_failure_during_plug_answers_busy_and_pins_nothing(rig: Rig) -> None:
    dev = rig.vmem(VMEM)
    mapper = rig.mapper()
    dev.requested_size = 8 * MiB
    for nth in (1, 2, 3):
        with faults.inject(Op.PIN, nth=nth):
            assert dev.plug(dev.addr, 3) is ResponseType.BUSY
        check(rig, mapper, 0)
    plug(dev, 0, 6 * MiB)
    check(rig, mapper, 6 * MiB)


def test_failure_after_construction_marks_the_block_and_recovers(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    mapper = rig.mapper()
    with faults.inject(Op.PIN, nth=1):
        late = rig.ram("late", 4 * MiB, map_at=None)
    status = mapper.block(late)
    assert status.mode is MappingMode.FAILED and isinstance(status.error, faults.InjectedFault)
    check(rig, mapper, PLAIN)
    rig.root.add_subregion(1 << 30, late)  # the next event of that block tries again
    assert mapper.block(late).mode is MappingMode.WHOLE
    check(rig, mapper, PLAIN + 4 * MiB)


def test_failed_unpin_is_retried(rig: Rig) -> None:
    dev = rig.vmem(VMEM)
    mapper = rig.mapper()
    plug(dev, 0, 4 * MiB)
    with faults.inject(Op.UNPIN, nth=1):
        unplug(dev, 0, 2 * MiB)
    assert len(mapper.stuck_pins) == 1
    check(rig, mapper, 4 * MiB)  # the stuck pin still holds its pages
    unplug(dev, 2 * MiB, 2 * MiB)  # the next teardown does not retry; close does
    mapper.close()
    assert mapper.stuck_pins == ()
    check(rig, mapper, 0)


def test_iova_exhaustion_and_bad_window_are_refused(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    rig.ram("more", PLAIN, map_at=1 << 30)
    with pytest.raises(Exception, match="no free range"):
        rig.mapper(iova_base=0, iova_size=16 * MiB)
    assert rig.backend.pinned_bytes == 0 and rig.policy.snapshot().uncoordinated_disable == 0
    with pytest.raises(InvalidArgument):
        rig.mapper(iova_align=3 * MiB)
    assert rig.policy.snapshot().uncoordinated_disable == 0


def test_close_is_idempotent_and_leaves_the_backend_open(rig: Rig) -> None:
    rig.ram("plain", PLAIN)
    mapper = rig.mapper()
    mapper.close()
    mapper.close()
    assert mapper.closed and not rig.backend.closed
    check(rig, mapper, 0)
