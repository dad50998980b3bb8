"""virtio-mem and guest_memfd attributes join one region in either order: the region's
manager is an aggregate of both, and unrealizing either leaves the other in charge."""

from __future__ import annotations

import pytest

from ramdiscard import RamBlockAttributes, RegionMapped
from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import AggregateManager, DiscardPolicy
from ramdiscard.units import GiB, MiB
from tests.conftest import FakeRam
from tests.providers.attributes.attr_helpers import PAGE, PageView

SIZE = 8 * MiB
BS = 2 * MiB
ADDR = 4 * GiB


class Ram(FakeRam):
    def discard_range(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        pass


@pytest.mark.parametrize("attributes_first", [True, False])
def test_either_realize_order_aggregates(attributes_first: bool) -> None:
    policy = DiscardPolicy()
    mr = MemoryRegion.new_ram("cvm", Ram(SIZE))
    if attributes_first:
        attrs = RamBlockAttributes(mr, use_kvm=False, policy=policy)
        attrs.convert(0, SIZE // 2, to_private=False)
        vmem = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE, policy=policy)
    else:
        vmem = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE, policy=policy)
        attrs = RamBlockAttributes(mr, use_kvm=False, policy=policy)
        attrs.convert(0, SIZE // 2, to_private=False)
    agg = mr.ram_discard_manager
    assert isinstance(agg, AggregateManager) and set(agg.sources) == {vmem, attrs}
    view = PageView()
    agg.register_listener(view, MemoryRegionSection(mr, 0, SIZE, ADDR))
    assert view.view == set()  # nothing plugged yet
    assert vmem.plug(ADDR, 3) == ResponseType.ACK  # 6 MiB plugged, first 4 MiB shared
    assert view.view == set(range(SIZE // 2 // PAGE))
    agg.unregister_listener(view)

    root = MemoryRegion.new_container("system", ADDR + SIZE)
    root.add_subregion(ADDR, vmem.device_region)
    space = AddressSpace("system", root)
    with pytest.raises(RegionMapped):
        vmem.unrealize()  # the device region must be unmapped first
    space.destroy()
    root.del_subregion(vmem.device_region)

    vmem.requested_size = 0
    assert vmem.unplug_all() == ResponseType.ACK
    vmem.unrealize()
    assert mr.ram_discard_manager is attrs  # the aggregate dissolved around the last source
    assert policy.snapshot().coordinated_require == 1
    attrs.close()
    assert mr.ram_discard_manager is None
    assert policy.snapshot().coordinated_require == 0
