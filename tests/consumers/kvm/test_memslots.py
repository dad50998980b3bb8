"""KvmMemslots on this machine's /dev/kvm: sections become real memslots, ids are reused,
the limit is enforced, and with virtio-mem dynamic memslots only memslots holding plugged
blocks exist."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ramdiscard import faults
from ramdiscard.consumers.kvm import Kvm, KvmMemslots, KvmVm, Memslot, MemslotsExhausted
from ramdiscard.errors import HostMemoryError
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryRegion, TopologyError
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

KVM_OK, KVM_REASON = Kvm.available()
pytestmark = pytest.mark.skipif(not KVM_OK, reason=KVM_REASON)


@pytest.fixture
def vm() -> Iterator[KvmVm]:
    with KvmVm() as v:
        yield v


def probe_slot_free(vm: KvmVm, slot: int, gpa: int, ram: RamBlock) -> bool:
    """True if KVM accepts a new slot ``slot`` at ``gpa`` (then removes it again)."""
    try:
        vm.set_user_memory_region(slot, gpa, 2 * MiB, ram.host_address)
    except HostMemoryError:
        return False
    vm.delete_memory_region(slot)
    return True


def test_sections_become_memslots_and_ids_are_reused(vm: KvmVm) -> None:
    rams = [RamBlock(4 * MiB, "anonymous") for _ in range(3)]
    root = MemoryRegion.new_container("sys", 1 * GiB)
    mrs = [MemoryRegion.new_ram(f"r{i}", r) for i, r in enumerate(rams)]
    root.add_subregion(0, mrs[0])
    root.add_subregion(64 * MiB, mrs[1])
    space = AddressSpace("sys", root)
    slots = KvmMemslots(vm)
    assert slots.nr_memslots == vm.nr_memslots() > 0
    slots.attach(space)
    assert slots.slots() == [
        Memslot(0, 0, 4 * MiB, rams[0].host_address),
        Memslot(1, 64 * MiB, 4 * MiB, rams[1].host_address),
    ]
    # KVM really holds them: the same gpa range cannot be registered again (EEXIST).
    assert not probe_slot_free(vm, 100, 0, rams[2])
    root.del_subregion(mrs[0])
    assert [m.slot for m in slots.slots()] == [1]
    assert probe_slot_free(vm, 100, 0, rams[2])  # gone from KVM
    root.add_subregion(128 * MiB, mrs[2])
    assert [(m.slot, m.gpa) for m in slots.slots()] == [(1, 64 * MiB), (0, 128 * MiB)]  # id 0 reused
    slots.detach()
    assert slots.slots() == [] and probe_slot_free(vm, 0, 64 * MiB, rams[2])
    space.destroy()
    for r in rams:
        r.close()


def test_exhausted_memslots_raise_and_create_nothing(vm: KvmVm) -> None:
    ram = RamBlock(8 * MiB, "anonymous")
    mr = MemoryRegion.new_ram("ram", ram)
    root = MemoryRegion.new_container("sys", 1 * GiB)
    aliases = [MemoryRegion.new_alias(f"a{i}", mr, i * 2 * MiB, 2 * MiB) for i in range(3)]
    for i, a in enumerate(aliases[:2]):
        root.add_subregion(i * 16 * MiB, a)
    space = AddressSpace("sys", root)
    slots = KvmMemslots(vm, max_slots=2)
    slots.attach(space)
    with pytest.raises(TopologyError) as info:
        root.add_subregion(64 * MiB, aliases[2])
    assert isinstance(info.value.__cause__, MemslotsExhausted)
    assert "in use" in str(info.value.__cause__)
    assert len(slots.slots()) == 2 and probe_slot_free(vm, 2, 64 * MiB, ram)
    slots.detach()
    space.destroy()
    ram.close()


def test_failed_ioctl_leaves_no_slot(vm: KvmVm) -> None:
    ram = RamBlock(4 * MiB, "anonymous")
    root = MemoryRegion.new_container("sys", 1 * GiB)
    root.add_subregion(0, MemoryRegion.new_ram("ram", ram))
    space = AddressSpace("sys", root)
    slots = KvmMemslots(vm)
    with faults.inject(faults.Op.KVM_IOCTL, nth=1), pytest.raises(faults.InjectedFault):
        slots.attach(space)
    assert slots.slots() == [] and slots.address_space is None and space.listeners == ()
    slots.attach(space)
    assert [m.slot for m in slots.slots()] == [0]
    slots.detach()
    space.destroy()
    ram.close()


def test_dynamic_memslots_follow_plug_and_unplug(vm: KvmVm) -> None:
    ram = RamBlock(4 * GiB, "anonymous")  # sparse: only plugged blocks get memory
    mr = MemoryRegion.new_ram("vmem", ram)
    addr = 4 * GiB
    dev = VirtioMem(
        mr, addr=addr, block_size=2 * MiB, requested_size=4 * GiB, policy=DiscardPolicy(),
        dynamic_memslots=True, memslot_limit=4,
    )  # fmt: skip
    boot = RamBlock(2 * MiB, "anonymous")
    root = MemoryRegion.new_container("sys", addr + dev.region_size)
    root.add_subregion(0, MemoryRegion.new_ram("boot", boot))
    root.add_subregion(addr, dev.device_region)
    space = AddressSpace("sys", root)
    slots = KvmMemslots(vm)
    slots.attach(space)

    def kvm_view() -> list[tuple[int, int]]:
        return [(m.gpa, m.size) for m in slots.slots()]

    assert kvm_view() == [(0, 2 * MiB)]
    assert dev.plug(addr + 1 * GiB + 4 * MiB, 2) is ResponseType.ACK
    assert kvm_view() == [(0, 2 * MiB), (addr + 1 * GiB, 1 * GiB)]
    assert slots.slots()[1].host_address == ram.host_address + 1 * GiB
    assert dev.plug(addr + 3 * GiB, 1) is ResponseType.ACK
    assert dev.plug(addr + 1 * GiB + 8 * MiB, 1) is ResponseType.ACK  # same memslot
    assert kvm_view() == [(0, 2 * MiB), (addr + 1 * GiB, 1 * GiB), (addr + 3 * GiB, 1 * GiB)]
    assert dev.unplug(addr + 1 * GiB + 4 * MiB, 2) is ResponseType.ACK  # memslot keeps a block
    assert len(kvm_view()) == 3
    assert dev.unplug(addr + 1 * GiB + 8 * MiB, 1) is ResponseType.ACK
    assert kvm_view() == [(0, 2 * MiB), (addr + 3 * GiB, 1 * GiB)]
    assert dev.unplug_all() is ResponseType.ACK
    assert kvm_view() == [(0, 2 * MiB)]
    slots.detach()
    for sub in root.subregions:
        root.del_subregion(sub)
    space.destroy()
    dev.unrealize()
    ram.close()
    boot.close()
