"""Helpers for the virtio-mem tests: RAM blocks (fake and real), devices, listeners."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ramdiscard import faults
from ramdiscard.errors import InvalidArgument
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryListener, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy, RamDiscardListener
from ramdiscard.units import GiB, MiB

BS = 2 * MiB
ADDR = 4 * GiB


class FakeRam:
    """A RAM block that only records calls (and honours fault injection)."""

    def __init__(self, size: int, page_size: int = 4096, host_address: int = 0x7F0000000000) -> None:
        self.size = size
        self.page_size = page_size
        self.host_address = host_address
        self.discards: list[tuple[int, int]] = []
        self.populates: list[tuple[int, int]] = []

    def _check(self, offset: int, length: int) -> None:
        if offset % self.page_size or length % self.page_size or offset < 0 or offset + length > self.size:
            raise InvalidArgument(f"bad range [{offset:#x}, +{length:#x})")

    def discard_range(self, offset: int, length: int) -> None:
        self._check(offset, length)
        faults.checkpoint(faults.Op.DISCARD)
        self.discards.append((offset, length))

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        self._check(offset, length)
        faults.checkpoint(faults.Op.POPULATE)
        self.populates.append((offset, length))


def real_ram(size: int, backing: str) -> Any:
    return RamBlock(size, backing)


@pytest.fixture(params=["fake", "anonymous", "memfd"])
def backing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["anonymous", "memfd"])
def real_backing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Factory:
    """Creates devices over fresh RAM and releases everything at teardown."""

    def __init__(self) -> None:
        self.policy = DiscardPolicy()
        self.devices: list[VirtioMem] = []
        self.rams: list[Any] = []
        self.spaces: list[AddressSpace] = []

    def ram(self, size: int, backing: str = "fake") -> Any:
        ram = FakeRam(size) if backing == "fake" else real_ram(size, backing)
        self.rams.append(ram)
        return ram

    def device(
        self,
        size: int = 64 * MiB,
        *,
        backing: str = "fake",
        addr: int = ADDR,
        block_size: int | None = BS,
        requested_size: int | None = None,
        **kw: Any,
    ) -> VirtioMem:
        mr = MemoryRegion.new_ram("vmem-ram", self.ram(size, backing))
        kw.setdefault("policy", self.policy)
        dev = VirtioMem(
            mr,
            addr=addr,
            block_size=block_size,
            requested_size=size if requested_size is None else requested_size,
            **kw,
        )
        self.devices.append(dev)
        return dev

    def map(self, dev: VirtioMem) -> tuple[MemoryRegion, AddressSpace]:
        root = MemoryRegion.new_container("system", dev.addr + dev.region_size)
        root.add_subregion(dev.addr, dev.device_region)
        space = AddressSpace("system", root)
        self.spaces.append(space)
        return root, space

    def close(self) -> None:
        for space in self.spaces:
            for listener in space.listeners:
                space.unregister_listener(listener)
            root = space.root
            for sub in root.subregions:
                root.del_subregion(sub)
            space.destroy()
        for dev in self.devices:
            for listener in dev.listeners:
                dev.unregister_listener(listener)
            dev.unrealize()
        for ram in self.rams:
            close = getattr(ram, "close", None)
            if close is not None:
                close()


@pytest.fixture
def make() -> Iterator[Factory]:
    f = Factory()
    yield f
    f.close()


class RecordingListener(RamDiscardListener):
    """Keeps the set of populated blocks it was told about (block-granular, region offsets).

    ``strict``: a populate of something already populated, or a discard of something not
    populated, is an assertion failure (unless double discard is supported).
    ``refuse``: predicate on the section; True makes notify_populate raise.
    """

    def __init__(
        self,
        granularity: int = BS,
        *,
        strict: bool = True,
        double_discard: bool = False,
        refuse: Callable[[MemoryRegionSection], bool] | None = None,
    ) -> None:
        self.g = granularity
        self.strict = strict
        self.double_discard_supported = double_discard
        self.refuse = refuse
        self.populated: set[int] = set()
        self.events: list[tuple[str, int, int]] = []

    def _blocks(self, s: MemoryRegionSection) -> range:
        return range(s.offset_within_region // self.g, -(-s.end // self.g))

    def notify_populate(self, section: MemoryRegionSection) -> None:
        if self.refuse is not None and self.refuse(section):
            raise OSError(12, "listener refuses")
        blocks = set(self._blocks(section))
        if self.strict:
            assert not blocks & self.populated, f"duplicate populate {section!r}"
        self.populated |= blocks
        self.events.append(("populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        blocks = set(self._blocks(section))
        if self.strict and not self.double_discard_supported:
            assert blocks <= self.populated, f"discard of unpopulated {section!r}"
        self.populated -= blocks
        self.events.append(("discard", section.offset_within_region, section.size))


def expected_view(dev: VirtioMem, section: MemoryRegionSection) -> set[int]:
    out: set[int] = set()
    for start, size in dev.plugged_ranges():
        part = section.intersect(start, size)
        if part is not None:
            out |= set(range(part.offset_within_region // BS, -(-part.end // BS)))
    return out


class VfioLikeListener(MemoryListener):
    """Registers one strict RamDiscardListener per RAM section that has a manager."""

    def __init__(self) -> None:
        self.rdls: dict[MemoryRegionSection, RecordingListener] = {}
        self.all_events: list[tuple[str, int, int]] = []

    def region_add(self, section: MemoryRegionSection) -> None:
        rdm = section.mr.ram_discard_manager
        if rdm is None:
            return
        rdl = RecordingListener(strict=True)
        rdl.events = self.all_events
        rdm.register_listener(rdl, section)
        self.rdls[section] = rdl

    def region_del(self, section: MemoryRegionSection) -> None:
        rdl = self.rdls.pop(section, None)
        if rdl is not None:
            assert rdl.manager is not None
            rdl.manager.unregister_listener(rdl)
