"""Helpers for the vfio tests: guest memory with a virtio-mem device or a plain
BlockStateManager, containers over real or null DMA backends, /proc readings."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ramdiscard.consumers.dma import iouring_available
from ramdiscard.consumers.vfio import IoUringDmaBackend, MlockDmaBackend, NullDmaBackend, VfioContainer
from ramdiscard.hostmem import RamBlock, proc_status
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

IOURING_OK, IOURING_REASON = iouring_available()
needs_iouring = pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)

BS = 2 * MiB
ADDR = 4 * GiB


def vm_pin() -> int:
    return proc_status().vm_pin


def vm_lck() -> int:
    return proc_status().vm_lck


class FakeRam:
    """RamBackend with an address but no memory (for NullDmaBackend tests)."""

    def __init__(self, size: int, host_address: int = 0x7F0000000000) -> None:
        self.size = size
        self.page_size = 4096
        self.host_address = host_address

    def discard_range(self, offset: int, length: int) -> None:
        pass

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        pass


class World:
    """Creates RAM, devices, address spaces, backends and containers; tears all down."""

    def __init__(self) -> None:
        self.policy = DiscardPolicy()
        self.device_policy = self.policy
        self.rams: list[Any] = []
        self.devices: list[VirtioMem] = []
        self.spaces: list[AddressSpace] = []
        self.backends: list[Any] = []
        self.containers: list[VfioContainer] = []

    def ram(self, size: int, backing: str = "anonymous", **kw: Any) -> Any:
        ram = FakeRam(size) if backing == "fake" else RamBlock(size, backing, **kw)
        self.rams.append(ram)
        return ram

    def vmem(
        self,
        size: int = 64 * MiB,
        backing: str = "anonymous",
        *,
        addr: int = ADDR,
        block_size: int = BS,
        policy: DiscardPolicy | None = None,
        ram_kw: dict[str, Any] | None = None,
        **kw: Any,
    ) -> VirtioMem:
        mr = MemoryRegion.new_ram("vmem-ram", self.ram(size, backing, **(ram_kw or {})))
        dev = VirtioMem(
            mr,
            addr=addr,
            block_size=block_size,
            requested_size=kw.pop("requested_size", size),
            policy=policy or self.device_policy,
            **kw,
        )
        self.devices.append(dev)
        return dev

    def space(self, *devices: VirtioMem, extra: list[tuple[int, MemoryRegion]] | None = None) -> AddressSpace:
        end = max([d.addr + d.region_size for d in devices] + [a + r.size for a, r in extra or []])
        root = MemoryRegion.new_container("system", end)
        for d in devices:
            root.add_subregion(d.addr, d.device_region)
        for a, r in extra or []:
            root.add_subregion(a, r)
        space = AddressSpace("system", root)
        self.spaces.append(space)
        return space

    def backend(self, kind: str = "iouring") -> Any:
        b: Any
        if kind == "iouring":
            if not IOURING_OK:
                pytest.skip(IOURING_REASON)
            b = IoUringDmaBackend(slots_per_ring=1024)
        elif kind == "mlock":
            b = MlockDmaBackend()
        else:
            b = NullDmaBackend()
        self.backends.append(b)
        return b

    def container(self, backend: Any = None, **kw: Any) -> VfioContainer:
        kw.setdefault("policy", self.policy)
        c = VfioContainer(backend if backend is not None else self.backend("null"), **kw)
        self.containers.append(c)
        return c

    def close(self) -> None:
        for c in self.containers:
            if c.address_space is not None:
                c.detach()
            c.unmap_all()
        for space in self.spaces:
            for listener in space.listeners:
                space.unregister_listener(listener)
            for sub in space.root.subregions:
                space.root.del_subregion(sub)
            space.destroy()
        for dev in self.devices:
            for listener in dev.listeners:
                dev.unregister_listener(listener)
            dev.unrealize()
        for b in self.backends:
            b.close()
        for ram in self.rams:
            close = getattr(ram, "close", None)
            if close is not None:
                close()


@pytest.fixture
def world() -> Iterator[World]:
    w = World()
    yield w
    w.close()
