"""Before/after the RamDiscardManager, on real memory, measured from /proc and the data.

Scenario (qemu-ram-discard §1.1/§4.1, host-limits.md surprise 7): a 64 MiB virtio-mem
device, a vfio-style container attached to guest memory, plug 16 MiB, write a pattern,
unplug the 4 MiB holding it.

* ``coordinate_discards=False`` (life before the seed; the device runs on its own policy
  since there was none then): the whole region is pinned at attach, so VmPin = region
  size, not plugged size; after the unplug the pins stay (VmPin unchanged) and are stale:
  DMA through the pin reads the old pattern while the guest view reads zeros.
* Coordinated: VmPin equals the plugged bytes after every step and the unplugged range is
  not resident any more (returned to the host).
* mlock is no page pin: VmLck instead of VmPin, and the kernel refuses MADV_DONTNEED on
  mlocked memory, so on anonymous memory every unplug answers BUSY, with or without
  coordination, because virtio-mem discards before it notifies (QEMU's order). On memfd,
  PUNCH_HOLE works on mlocked pages: the memory is returned, but without coordination the
  locked (VmLck) range stays the whole region.
"""

from __future__ import annotations

import pytest

from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB

from .conftest import ADDR, World, vm_lck, vm_pin

REGION = 64 * MiB


def setup(world: World, backing: str, kind: str, coordinate: bool):  # type: ignore[no-untyped-def]
    if not coordinate:
        world.device_policy = DiscardPolicy()
    dev = world.vmem(REGION, backing)
    space = world.space(dev)
    backend = world.backend(kind)
    c = world.container(backend, coordinate_discards=coordinate)
    return dev, space, backend, c


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_iouring_uncoordinated_pins_everything_and_leaves_stale_pins(world: World, backing: str) -> None:
    dev, space, backend, c = setup(world, backing, "iouring", coordinate=False)
    pin0 = vm_pin()
    c.attach(space)
    assert vm_pin() - pin0 == REGION  # not the plugged size (0)
    assert dev.plug(ADDR, 8) is ResponseType.ACK
    dev.ram.write(0, b"A" * 4096)
    assert vm_pin() - pin0 == REGION  # 16 MiB plugged, 64 MiB pinned
    handle = c.pin_of(ADDR)
    assert dev.unplug(ADDR, 2) is ResponseType.ACK
    assert vm_pin() - pin0 == REGION  # the unplugged memory stays pinned ...
    assert dev.ram.read(0, 4) == b"\0" * 4  # ... the guest sees fresh zero pages ...
    assert backend.dma_read(handle, 0, 4) == b"AAAA"  # ... the device still the old frames
    c.detach()
    assert vm_pin() == pin0


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_iouring_coordinated_pins_only_plugged_memory(world: World, backing: str) -> None:
    dev, space, backend, c = setup(world, backing, "iouring", coordinate=True)
    ram = dev.ram
    pin0 = vm_pin()
    c.attach(space)
    assert vm_pin() - pin0 == 0 == dev.plugged_size
    steps = [
        ("plug", ADDR, 8),
        ("unplug", ADDR, 2),
        ("plug", ADDR + 32 * MiB, 4),
        ("unplug", ADDR + 6 * MiB, 5),
    ]
    for what, addr, n in steps:
        if what == "plug":
            assert dev.plug(addr, n) is ResponseType.ACK
            ram.write(addr - ADDR, b"P" * 4096)
        else:
            assert dev.unplug(addr, n) is ResponseType.ACK
            assert ram.resident_bytes(addr - ADDR, n * 2 * MiB) == 0  # returned
        assert vm_pin() - pin0 == dev.plugged_size == c.mapped_bytes == backend.pinned_bytes
    # The remaining pins see what the guest sees (nothing stale).
    for m in c.mappings():
        off = m.iova - ADDR
        assert backend.dma_read(c.pin_of(m.iova), 0, 64) == ram.read(off, 64)
    c.detach()
    assert vm_pin() == pin0 and backend.pin_count == 0


@pytest.mark.parametrize("coordinate", [False, True], ids=["uncoordinated", "coordinated"])
def test_mlock_on_anonymous_memory_makes_unplug_busy(world: World, coordinate: bool) -> None:
    dev, space, _backend, c = setup(world, "anonymous", "mlock", coordinate)
    lck0 = vm_lck()
    c.attach(space)
    assert vm_lck() - lck0 == (0 if coordinate else REGION)
    assert dev.plug(ADDR, 8) is ResponseType.ACK
    dev.ram.write(0, b"A" * 4096)
    assert vm_lck() - lck0 == (16 * MiB if coordinate else REGION)
    # virtio-mem discards before notifying; MADV_DONTNEED on mlocked memory is EINVAL.
    assert dev.unplug(ADDR, 2) is ResponseType.BUSY
    assert dev.plugged_size == 16 * MiB and dev.ram.read(0, 4) == b"AAAA"
    assert vm_lck() - lck0 == (16 * MiB if coordinate else REGION)
    c.detach()
    assert vm_lck() == lck0


@pytest.mark.parametrize("coordinate", [False, True], ids=["uncoordinated", "coordinated"])
def test_mlock_on_memfd_returns_memory_but_locks_the_region_without_coordination(
    world: World, coordinate: bool
) -> None:
    dev, space, _backend, c = setup(world, "memfd", "mlock", coordinate)
    lck0 = vm_lck()
    c.attach(space)
    assert dev.plug(ADDR, 8) is ResponseType.ACK
    dev.ram.write(0, b"A" * 4096)
    assert dev.unplug(ADDR, 2) is ResponseType.ACK  # PUNCH_HOLE works on mlocked shmem
    assert dev.ram.resident_bytes(0, 4 * MiB) == 0
    assert vm_lck() - lck0 == (12 * MiB if coordinate else REGION)
    c.detach()
    assert vm_lck() == lck0
