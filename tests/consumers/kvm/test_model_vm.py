"""KvmMemslots over ModelVm (no /dev/kvm): the same bookkeeping, limit and counters."""

from __future__ import annotations

import pytest

from ramdiscard.consumers.kvm import KvmMemslots, MemslotsExhausted, ModelVm
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryRegion, TopologyError
from ramdiscard.units import GiB, MiB


def test_model_vm_counts_slots_and_enforces_the_limit() -> None:
    rams = [RamBlock(2 * MiB, "anonymous") for _ in range(3)]
    root = MemoryRegion.new_container("sys", 1 * GiB)
    mrs = [MemoryRegion.new_ram(f"m{i}", r) for i, r in enumerate(rams)]
    space = AddressSpace("sys", root)
    slots = KvmMemslots(ModelVm(nr_memslots=2))
    try:
        slots.attach(space)
        root.add_subregion(0, mrs[0])
        root.add_subregion(64 * MiB, mrs[1])
        assert [m.slot for m in slots.slots()] == [0, 1] and slots.slot_count == 2
        with pytest.raises(TopologyError) as info:
            root.add_subregion(128 * MiB, mrs[2])
        assert isinstance(info.value.__cause__, MemslotsExhausted)
        assert slots.slot_count == 2  # the region stays a subregion, without a memslot
        root.del_subregion(mrs[2])
        root.del_subregion(mrs[0])
        root.add_subregion(128 * MiB, mrs[2])
        assert [(m.slot, m.gpa) for m in slots.slots()] == [(1, 64 * MiB), (0, 128 * MiB)]
        assert (slots.created, slots.deleted, slots.peak_slots) == (3, 1, 2)
    finally:
        slots.close()
        for mr in list(root.subregions):
            root.del_subregion(mr)
        space.destroy()
        for r in rams:
            r.close()
    assert slots.slot_count == 0 and slots.deleted == 3
