"""The memory model: regions, sections, address spaces and their listeners."""

from ramdiscard.interfaces import HostMemory as RamBackend
from ramdiscard.memory.address_space import AddressSpace, MemoryListener, render_flatview
from ramdiscard.memory.region import MemoryRegion, RegionKind
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.memory.topology import TopologyError, transaction

__all__ = [
    "AddressSpace",
    "MemoryListener",
    "MemoryRegion",
    "MemoryRegionSection",
    "RamBackend",
    "RegionKind",
    "TopologyError",
    "render_flatview",
    "transaction",
]
