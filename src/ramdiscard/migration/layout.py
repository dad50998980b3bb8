"""Which RAM regions a migration carries, and how each side finds them.

Rules:

* A migration carries RAM regions (QEMU's RAMBlocks), not address ranges. Every RAM
  region of a given virtio-mem device is *managed*: only the runs its manager reports
  populated (``replay_populated``) are sent. Every other RAM region that appears in the
  address space's flat view is sent whole, once, however many times it is mapped.
* A RAM region in the flat view that has a manager but no device among ``devices`` is an
  error: its state could not be restored on the other side.
* Regions are ordered by guest-physical address (a device's ``addr``, an unmanaged
  region's first mapping), then name; both sides compute the same order from the same
  machine configuration, and the destination compares the lists field by field.
* A region's host memory must be reachable as a writable memoryview (``ram.view``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.interfaces import MappedMemory
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.migration.stream import MigrationError, RegionInfo, RegionKind

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ramdiscard.memory import AddressSpace, MemoryRegion
    from ramdiscard.providers.virtio_mem import VirtioMem


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One RAM region taking part in a migration."""

    index: int
    mr: MemoryRegion
    gpa: int
    device: VirtioMem | None

    @property
    def size(self) -> int:
        return self.mr.size

    @property
    def page_size(self) -> int:
        ram = self.mr.ram
        assert ram is not None
        return int(ram.page_size)

    @property
    def view(self) -> memoryview:
        """The region's host memory (the RAM block's view, not a copy)."""
        ram = self.mr.ram
        if not isinstance(ram, MappedMemory):
            raise MigrationError(f"RAM region {self.mr.name!r}: its RAM block has no memory view")
        return ram.view

    def info(self) -> RegionInfo:
        kind = RegionKind.MANAGED if self.device is not None else RegionKind.WHOLE
        dev = self.device.id if self.device is not None else ""
        return RegionInfo(self.index, kind, self.size, self.gpa, self.page_size, self.mr.name, dev)

    def populated_runs(self) -> list[tuple[int, int]]:
        """(region offset, length) of what is sent: the manager's populated runs, ascending
        (queried with ``replay_populated``), or the whole region without a manager."""
        if self.device is None:
            return [(0, self.size)]
        runs: list[tuple[int, int]] = []

        def add(section: MemoryRegionSection) -> None:
            runs.append((section.offset_within_region, section.size))

        self.device.replay_populated(MemoryRegionSection(self.mr, 0, self.mr.size), add)
        return runs

    def discarded_runs(self) -> list[tuple[int, int]]:
        if self.device is None:
            return []
        runs: list[tuple[int, int]] = []

        def add(section: MemoryRegionSection) -> None:
            runs.append((section.offset_within_region, section.size))

        self.device.replay_discarded(MemoryRegionSection(self.mr, 0, self.mr.size), add)
        return runs


def collect_regions(address_space: AddressSpace, devices: Sequence[VirtioMem]) -> list[RamRegion]:
    """The RAM regions of a migration (module rules). Raises MigrationError for duplicate
    device ids, a managed region without its device, or a region without a memory view."""
    by_region: dict[int, VirtioMem] = {}
    ids: set[str] = set()
    for dev in devices:
        if dev.id in ids:
            raise MigrationError(f"two devices with id {dev.id!r}")
        ids.add(dev.id)
        by_region[id(dev.region)] = dev
    found: list[tuple[int, str, MemoryRegion, VirtioMem | None]] = [
        (dev.addr, dev.region.name, dev.region, dev) for dev in devices
    ]
    seen: set[int] = set(by_region)
    for section in address_space.flatview():
        mr = section.mr
        if not mr.is_ram or mr.ram is None or id(mr) in seen:
            continue
        if mr.ram_discard_manager is not None:
            raise MigrationError(
                f"RAM region {mr.name!r} has a RamDiscardManager but no device for it was given"
            )
        seen.add(id(mr))
        found.append((section.offset_within_address_space - section.offset_within_region, mr.name, mr, None))
    found.sort(key=lambda t: (t[0], t[1]))
    regions = [RamRegion(i, mr, gpa, dev) for i, (gpa, _n, mr, dev) in enumerate(found)]
    for region in regions:
        region.view  # noqa: B018 - raises early for a RAM block without a view
    return regions
