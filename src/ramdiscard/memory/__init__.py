"""The memory model: regions, sections, address spaces and their listeners."""

from ramdiscard.interfaces import HostMemory as RamBackend
from ramdiscard.memory.address_space import AddressSpace, MemoryListener, render_flatview
from ramdiscard.memory.region import MemoryRegion, RegionDiscardManager, RegionKind
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.memory.system import MemorySystem, RamRegionObserver, TopologyError, default_system
from ramdiscard.memory.topology import transaction

__all__ = [
    "AddressSpace",
    "MemoryListener",
    "MemoryRegion",
    "MemoryRegionSection",
    "MemorySystem",
    "RamBackend",
    "RamRegionObserver",
    "RegionDiscardManager",
    "RegionKind",
    "TopologyError",
    "default_system",
    "render_flatview",
    "transaction",
]
