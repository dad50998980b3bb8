"""A vfio container with real io_uring pinning on a region where virtio-mem plugs blocks and
guest_memfd attributes convert pages: VmPin equals the aggregate populated bytes (plugged
and shared) after every step, and the container's mappings are exactly those bytes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard import RamBlockAttributes
from ramdiscard.consumers.dma import iouring_available
from ramdiscard.consumers.vfio import IoUringDmaBackend, VfioContainer
from ramdiscard.hostmem import RamBlock, proc_status
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import AggregateManager, DiscardPolicy
from ramdiscard.units import GiB, MiB

IOURING_OK, IOURING_REASON = iouring_available()
pytestmark = pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)

SIZE = 8 * MiB
BS = 2 * MiB
PAGE = 4096
ADDR = 4 * GiB
BLOCKS = SIZE // BS
PAGES = SIZE // PAGE

step = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, BLOCKS - 1), st.integers(1, 2)),
    st.tuples(st.just("unplug"), st.integers(0, BLOCKS - 1), st.integers(1, 2)),
    st.tuples(st.just("share"), st.integers(0, PAGES - 1), st.integers(1, 700)),
    st.tuples(st.just("private"), st.integers(0, PAGES - 1), st.integers(1, 700)),
)


def run_steps(steps: list[tuple[str, int, int]]) -> None:
    policy = DiscardPolicy()
    ram = RamBlock(SIZE, name="cvm", thp=False)  # 4 KiB pages: VmPin counts exactly what is pinned
    mr = MemoryRegion.new_ram("cvm", ram)
    vmem = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE, policy=policy)
    attrs = RamBlockAttributes(mr, use_kvm=False, policy=policy)
    assert isinstance(mr.ram_discard_manager, AggregateManager)
    root = MemoryRegion.new_container("system", ADDR + SIZE)
    root.add_subregion(ADDR, vmem.device_region)
    space = AddressSpace("system", root)
    backend = IoUringDmaBackend()
    container = VfioContainer(backend, policy=policy)
    base_pin = proc_status().vm_pin
    plugged: set[int] = set()
    shared: set[int] = set()
    per_block = BS // PAGE
    container.attach(space)
    try:
        for kind, a, b in steps:
            if kind in ("plug", "unplug"):
                nb = min(b, BLOCKS - a)
                pages = set(range(a * per_block, (a + nb) * per_block))
                if kind == "plug":
                    if vmem.plug(ADDR + a * BS, nb) == ResponseType.ACK:
                        plugged |= pages
                elif vmem.unplug(ADDR + a * BS, nb) == ResponseType.ACK:
                    plugged -= pages
            else:
                count = min(b, PAGES - a)
                pages = set(range(a, a + count))
                attrs.convert(a * PAGE, count * PAGE, to_private=kind == "private")
                shared = shared - pages if kind == "private" else shared | pages
            expected = len(plugged & shared) * PAGE
            assert container.mapped_bytes == expected
            assert backend.pinned_bytes == expected
            assert proc_status().vm_pin - base_pin == expected
            mapped_pages = {
                (m.iova - ADDR) // PAGE + i for m in container.mappings() for i in range(m.size // PAGE)
            }
            assert mapped_pages == plugged & shared
    finally:
        container.detach()
        container.close()
        backend.close()
    assert proc_status().vm_pin == base_pin
    space.destroy()
    root.del_subregion(vmem.device_region)
    attrs.close()
    vmem.requested_size = 0
    vmem.unplug_all()
    vmem.unrealize()
    ram.close()


def test_vmpin_follows_plugs_and_conversions() -> None:
    run_steps(
        [
            ("share", 0, PAGES),
            ("plug", 0, 2),
            ("private", 100, 200),
            ("plug", 3, 1),
            ("unplug", 1, 1),
            ("share", 100, 50),
            ("private", 0, PAGES),
            ("share", 600, 700),
            ("unplug", 0, 1),
        ]
    )


@settings(max_examples=15, deadline=None)
@given(st.lists(step, max_size=12))
def test_vmpin_follows_random_plugs_and_conversions(steps: list[tuple[str, int, int]]) -> None:
    run_steps(steps)
