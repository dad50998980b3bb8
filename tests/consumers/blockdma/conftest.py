"""A small machine for the block-mapper tests: plain RAM and virtio-mem on real host memory."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from ramdiscard.consumers.blockdma import RamBlockDmaMapper
from ramdiscard.consumers.dma import DmaBackend, IoUringDmaBackend, iouring_available
from ramdiscard.hostmem import RamBlock, proc_status
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.providers.virtio_mem.wire import ResponseType
from ramdiscard.ramblocks import RamBlockRegistry
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

IOURING_OK, IOURING_REASON = iouring_available()
needs_iouring = pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)

BS = 2 * MiB
VMEM_ADDR = 4 * GiB


class Rig:
    """Guest memory (an address space over a container), a private RAM block registry and
    policy, an io_uring backend, and VmPin measured against the value at creation."""

    def __init__(self, backend: DmaBackend) -> None:
        self.policy = DiscardPolicy()
        self.registry = RamBlockRegistry("test")
        self.root = MemoryRegion.new_container("system", 1 << 40)
        self.space = AddressSpace("system", self.root)
        self.backend = backend
        self.rams: list[RamBlock] = []
        self.devices: list[VirtioMem] = []
        self.mappers: list[RamBlockDmaMapper] = []
        self.base_pin = proc_status().vm_pin

    def ram(
        self, name: str, size: int, *, max_size: int | None = None, map_at: int | None = 0
    ) -> MemoryRegion:
        block = RamBlock(size, thp=False, max_size=max_size, name=name)
        self.rams.append(block)
        mr = MemoryRegion.new_ram(name, block)
        self.registry.add(mr)
        if map_at is not None:
            self.root.add_subregion(map_at, mr)
        return mr

    def vmem(
        self, size: int, *, requested: int = 0, dynamic: bool = False, addr: int = VMEM_ADDR
    ) -> VirtioMem:
        mr = self.ram(f"vmem-mem{len(self.devices)}", size, map_at=None)
        dev = VirtioMem(
            mr,
            addr=addr,
            id=f"vmem{len(self.devices)}",
            block_size=BS,
            requested_size=requested,
            policy=self.policy,
            dynamic_memslots=dynamic,
        )
        self.devices.append(dev)
        self.root.add_subregion(addr, dev.device_region)
        return dev

    def mapper(self, **kwargs: object) -> RamBlockDmaMapper:
        m = RamBlockDmaMapper(self.backend, policy=self.policy, registry=self.registry, **kwargs)  # type: ignore[arg-type]
        self.mappers.append(m)
        return m

    def vm_pin(self) -> int:
        return proc_status().vm_pin - self.base_pin

    def close(self) -> None:
        for m in self.mappers:
            m.close()
        for dev in self.devices:
            with contextlib.suppress(Exception):
                if dev.device_region.container is not None:
                    self.root.del_subregion(dev.device_region)
                dev.unrealize()
        self.backend.close()
        self.space.destroy()
        for block in self.rams:
            block.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    r = Rig(IoUringDmaBackend())
    try:
        yield r
    finally:
        r.close()


def plug(dev: VirtioMem, offset: int, size: int) -> None:
    dev.requested_size = max(dev.requested_size, dev.plugged_size + size)
    assert dev.plug(dev.addr + offset, size // dev.block_size) is ResponseType.ACK


def unplug(dev: VirtioMem, offset: int, size: int) -> None:
    assert dev.unplug(dev.addr + offset, size // dev.block_size) is ResponseType.ACK
