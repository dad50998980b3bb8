"""VfioContainer as a memory listener: RDM sections, replay, rollback, policy, DMA limit,
detach, vIOMMU. Bookkeeping checks use NullDmaBackend; pins on real memory are in
test_real_memory.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard import faults
from ramdiscard.consumers.vfio import (
    DmaLimitError,
    IommuMapRefused,
    IommuPinWarning,
    MappingLimitError,
    RdmRange,
    VfioContainer,
    check_dma_limit,
    smallest_granularity,
    worst_case_mappings,
)
from ramdiscard.errors import DiscardPolicyError
from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.rdm import BlockStateManager
from ramdiscard.units import GiB, MiB

from .conftest import ADDR, BS, World

HOST = 0x7F0000000000


def expected_mappings(dev_addr: int, runs: list[tuple[int, int]], g: int = BS) -> list[tuple[int, int]]:
    out = []
    for start, size in runs:
        for off in range(start, start + size, g):
            out.append((dev_addr + off, g))
    return out


def iovas(c: VfioContainer) -> list[tuple[int, int]]:
    return [(m.iova, m.size) for m in c.mappings()]


def test_plain_ram_is_mapped_whole_and_rdm_ram_by_plugged_granules(world: World) -> None:
    dev = world.vmem(32 * MiB, "fake")
    boot = MemoryRegion.new_ram("boot", world.ram(16 * MiB, "fake"))
    space = world.space(dev, extra=[(0, boot)])
    c = world.container()
    c.attach(space)
    assert iovas(c) == [(0, 16 * MiB)]
    assert c.mappings()[0].host_address == boot.ram.host_address  # type: ignore[union-attr]
    assert dev.plug(ADDR + 4 * MiB, 3) is ResponseType.ACK
    assert iovas(c) == [(0, 16 * MiB), *expected_mappings(ADDR, [(4 * MiB, 6 * MiB)])]
    m = c.mappings()[2]
    assert m.host_address == dev.ram.host_address + 6 * MiB
    assert dev.unplug(ADDR + 6 * MiB, 1) is ResponseType.ACK
    assert iovas(c) == [(0, 16 * MiB), (ADDR + 4 * MiB, BS), (ADDR + 8 * MiB, BS)]
    assert c.backend.pinned_bytes == c.mapped_bytes == 16 * MiB + 4 * MiB


def test_attach_after_plugging_replays_and_detach_unpins_everything(world: World) -> None:
    dev = world.vmem(64 * MiB, "fake")
    for addr, n in ((ADDR, 2), (ADDR + 10 * MiB, 4), (ADDR + 62 * MiB, 1)):
        assert dev.plug(addr, n) is ResponseType.ACK
    space = world.space(dev)
    c = world.container()
    c.attach(space)
    assert iovas(c) == expected_mappings(ADDR, list(dev.plugged_ranges()))
    assert world.policy.snapshot().uncoordinated_disable == 1
    c.detach()
    assert c.mapping_count == 0 and c.backend.pin_count == 0 and dev.listeners == ()
    assert world.policy.snapshot().uncoordinated_disable == 0
    c.attach(space)  # and again
    assert iovas(c) == expected_mappings(ADDR, list(dev.plugged_ranges()))


def test_block_state_manager_section_cut_at_granularity_in_region_offsets(world: World) -> None:
    # A section that starts in the middle of a granule: the first piece is clipped.
    ram = world.ram(16 * MiB, "fake")
    mr = MemoryRegion.new_ram("ram", ram)
    bsm = BlockStateManager(mr, 4 * MiB)
    mr.set_ram_discard_manager(bsm)
    alias = MemoryRegion.new_alias("win", mr, 2 * MiB, 12 * MiB)
    root = MemoryRegion.new_container("sys", 1 * GiB)
    root.add_subregion(64 * MiB, alias)
    space = AddressSpace("sys", root)
    world.spaces.append(space)
    c = world.container()
    c.attach(space)
    bsm.set_populated(0, 16 * MiB)
    # region offsets [2M,4M) [4M,8M) [8M,12M) [12M,14M) at address 64M + (off - 2M)
    assert iovas(c) == [(64 * MiB, 2 * MiB), (66 * MiB, 4 * MiB), (70 * MiB, 4 * MiB), (74 * MiB, 2 * MiB)]
    assert [m.host_address - HOST for m in c.mappings()] == [2 * MiB, 4 * MiB, 8 * MiB, 12 * MiB]
    bsm.set_discarded(4 * MiB, 4 * MiB)
    assert iovas(c) == [(64 * MiB, 2 * MiB), (70 * MiB, 4 * MiB), (74 * MiB, 2 * MiB)]
    c.detach()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pin_failure_mid_plug_rolls_everything_back(world: World, k: int) -> None:
    from .conftest import IOURING_OK, IOURING_REASON

    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    dev = world.vmem(32 * MiB, "anonymous")
    space = world.space(dev)
    b = world.backend("iouring")
    c = world.container(b)
    other = world.container(world.backend("null"))  # a second consumer, notified first
    other.attach(space)
    c.attach(space)
    assert dev.plug(ADDR, 2) is ResponseType.ACK
    from .conftest import vm_pin

    before = (vm_pin(), dev.bitmap_bytes(), iovas(c), iovas(other), b.pin_count, dev.plugged_size)
    with faults.inject(faults.Op.PIN, nth=k) as plan:
        assert dev.plug(ADDR + 8 * MiB, 4) is ResponseType.BUSY
    assert plan.fired == 1
    after = (vm_pin(), dev.bitmap_bytes(), iovas(c), iovas(other), b.pin_count, dev.plugged_size)
    assert after == before
    assert dev.plug(ADDR + 8 * MiB, 4) is ResponseType.ACK  # and it works afterwards
    assert iovas(c) == iovas(other) == expected_mappings(ADDR, list(dev.plugged_ranges()))


def test_two_containers_on_overlapping_sections(world: World) -> None:
    dev = world.vmem(32 * MiB, "fake")
    space_a = world.space(dev)
    # A second address space sees only the upper half of the device, through an alias.
    alias = MemoryRegion.new_alias("upper", dev.device_region, 16 * MiB, 16 * MiB)
    root_b = MemoryRegion.new_container("dev-as", 1 * GiB)
    root_b.add_subregion(0, alias)
    space_b = AddressSpace("dev-as", root_b)
    world.spaces.append(space_b)
    a, b = world.container(), world.container()
    a.attach(space_a)
    b.attach(space_b)
    assert world.policy.snapshot().uncoordinated_disable == 2
    assert dev.plug(ADDR + 12 * MiB, 4) is ResponseType.ACK  # straddles the halves
    assert iovas(a) == expected_mappings(ADDR, [(12 * MiB, 8 * MiB)])
    assert iovas(b) == [(0, BS), (BS, BS)]
    assert dev.unplug(ADDR + 16 * MiB, 1) is ResponseType.ACK
    assert iovas(b) == [(BS, BS)] and len(iovas(a)) == 3
    a.detach()
    assert iovas(b) == [(BS, BS)] and len(dev.listeners) == 1
    b.detach()


def test_dma_limit_failure_leaves_nothing_registered(world: World) -> None:
    dev = world.vmem(64 * MiB, "fake")
    assert dev.plug(ADDR, 4) is ResponseType.ACK
    boot = MemoryRegion.new_ram("boot", world.ram(4 * MiB, "fake"))
    space = world.space(dev, extra=[(0, boot)])
    # 32 granules + 10 memslots - 1 record = 41 > 40
    c = world.container(max_mappings=40, max_memslots=10)
    with pytest.raises(DmaLimitError, match="block-size"):
        c.attach(space)
    assert c.mapping_count == 0 and c.backend.pin_count == 0
    assert dev.listeners == () and c.address_space is None and space.listeners == ()
    assert world.policy.snapshot().uncoordinated_disable == 0
    ok = world.container(max_mappings=41, max_memslots=10)
    ok.attach(space)
    assert ok.mapping_count == 1 + 4


def test_attach_failing_midway_leaves_nothing(world: World) -> None:
    dev = world.vmem(32 * MiB, "fake")
    assert dev.plug(ADDR, 2) is ResponseType.ACK
    boot = MemoryRegion.new_ram("boot", world.ram(4 * MiB, "fake"))
    space = world.space(dev, extra=[(0, boot)])
    c = world.container()
    # The second pin_many (the device section's replay, after the boot RAM) fails.
    calls = {"n": 0}
    real = c.backend._pin_many_impl

    def failing(ranges):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(12, "no memory")
        return real(ranges)

    c.backend._pin_many_impl = failing  # type: ignore[method-assign]
    with pytest.raises(OSError):
        c.attach(space)
    assert c.mapping_count == 0 and c.backend.pin_count == 0 and dev.listeners == ()
    assert space.listeners == () and world.policy.snapshot().uncoordinated_disable == 0


def test_policy_coordinated_vs_uncoordinated(world: World) -> None:
    dev = world.vmem(16 * MiB, "fake")
    space = world.space(dev)
    coordinated = world.container()
    coordinated.attach(space)  # coexists with virtio-mem's coordinated-require
    with pytest.raises(DiscardPolicyError):
        world.policy.require()  # a balloon-style uncoordinated discarder is refused
    legacy = world.container(coordinate_discards=False)
    with pytest.raises(DiscardPolicyError):
        legacy.attach(space)  # disable conflicts with virtio-mem (like sPAPR / nvme://)
    assert legacy.mapping_count == 0 and space.listeners == (coordinated,)
    coordinated.detach()
    world.policy.require()
    world.policy.require(False)


def test_dynamic_memslots_one_listener_per_mapped_memslot(world: World) -> None:
    dev = world.vmem(4 * GiB, "fake", dynamic_memslots=True, memslot_limit=4)
    space = world.space(dev)
    c = world.container()
    c.attach(space)
    assert c.rdm_sections() == [] and c.mapping_count == 0
    assert dev.plug(ADDR + 1 * GiB + 2 * MiB, 2) is ResponseType.ACK
    assert [r.registered_section.offset_within_address_space for r in c.rdm_sections()] == [ADDR + 1 * GiB]
    assert dev.plug(ADDR + 3 * GiB, 1) is ResponseType.ACK
    assert len(c.rdm_sections()) == 2 and c.mapping_count == 3
    assert dev.unplug(ADDR + 1 * GiB + 2 * MiB, 2) is ResponseType.ACK
    assert len(c.rdm_sections()) == 1 and iovas(c) == [(ADDR + 3 * GiB, BS)]


def test_iommu_map_refuses_unpopulated_and_warns_once(world: World) -> None:
    dev = world.vmem(16 * MiB, "fake")
    space = world.space(dev)
    c = world.container()
    assert dev.plug(ADDR, 2) is ResponseType.ACK
    mr = dev.region
    with pytest.raises(IommuMapRefused, match="discarded memory"):
        c.iommu_map(0x1000_0000, MemoryRegionSection(mr, 2 * MiB, 4 * MiB))
    assert c.mapping_count == 0 and c.backend.pin_count == 0
    with pytest.warns(IommuPinWarning):
        c.iommu_map(0x1000_0000, MemoryRegionSection(mr, 0, 4 * MiB))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.iommu_map(0x2000_0000, MemoryRegionSection(mr, 0, 1 * MiB))  # no second warning
    assert iovas(c) == [(0x1000_0000, 4 * MiB), (0x2000_0000, 1 * MiB)]
    assert c.iommu_unmap(0x1000_0000, 0x2000_0000) == 5 * MiB
    del space


def test_dma_limit_check_off_shows_the_limit_at_run_time(world: World) -> None:
    dev = world.vmem(64 * MiB, "fake", requested_size=64 * MiB)
    space = world.space(dev)
    # The worst case (32 granules + 10 memslots - 1) exceeds 20; without the check the
    # section registers and the limit shows when a populate needs more than is left.
    c = world.container(max_mappings=20, max_memslots=10, dma_limit_check=False)
    c.attach(space)
    assert c.worst_case_mappings() == 41
    assert dev.plug(ADDR, 16) is ResponseType.ACK
    assert dev.plug(ADDR + 16 * BS, 8) is ResponseType.BUSY  # 24 > 20: refused whole
    assert c.mapping_count == 16 and c.refused_maps == 1 and c.backend.pin_count == 16
    assert dev.plug(ADDR + 16 * BS, 4) is ResponseType.ACK
    assert c.peak_mapping_count == 20 and c.peak_mapped_bytes == 20 * BS
    assert dev.unplug(ADDR, 20) is ResponseType.ACK
    assert c.mapping_count == 0 and c.peak_mapping_count == 20 and c.peak_mapped_bytes == 20 * BS
    with pytest.raises(MappingLimitError):
        for i in range(21):
            c.dma_map(i * 4096, 0x7F0000000000 + i * 4096, 4096)
    assert c.refused_maps == 2 and c.mapping_count == 20


def test_dma_limit_message_names_a_block_size_that_fits() -> None:
    # 256 GiB of hot-pluggable memory: 8 MiB blocks fit the default limit with 512 memslots.
    records = [RdmRange(4 * GiB, 256 * GiB, BS)]
    assert smallest_granularity(records, 512, 65535) == 8 * MiB
    with pytest.raises(DmaLimitError, match="block-size of at least 8 MiB"):
        check_dma_limit(records, 512, 65535)
    assert smallest_granularity(records, 70000, 65535) is None
    with pytest.raises(DmaLimitError, match="no block-size fits"):
        check_dma_limit(records, 70000, 65535)
    check_dma_limit([RdmRange(4 * GiB, 256 * GiB, 8 * MiB)], 512, 65535)


@given(
    st.lists(st.tuples(st.integers(0, 64), st.integers(1, 64), st.integers(20, 24)), min_size=1, max_size=4),
    st.integers(0, 600),
    st.integers(1, 5000),
)
def test_smallest_granularity_is_the_smallest_that_passes(
    recs: list[tuple[int, int, int]], memslots: int, limit: int
) -> None:
    records = [RdmRange(a * MiB, n * MiB, 1 << g) for a, n, g in recs]
    g = smallest_granularity(records, memslots, limit)

    def passes(gran: int) -> bool:
        widened = [RdmRange(r.address, r.size, max(gran, r.granularity)) for r in records]
        return worst_case_mappings(widened, memslots) <= limit

    if g is None:
        assert not any(passes(1 << k) for k in range(20, 40))
    else:
        assert passes(g) and (g == MiB or not passes(g // 2))
