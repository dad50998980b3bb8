"""ramdiscard: QEMU's RamDiscardManager system in Python, on real host memory."""

from ramdiscard.errors import (
    DiscardPolicyError,
    HostMemoryError,
    InvalidArgument,
    ListenerError,
    ManagerBusy,
    RamDiscardError,
    RegionMapped,
)
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import (
    AddressSpace,
    MemoryListener,
    MemoryRegion,
    MemoryRegionSection,
    MemorySystem,
    RegionKind,
    TopologyError,
    default_system,
    transaction,
)
from ramdiscard.memory.region import install_ram_factory
from ramdiscard.providers.attributes import RamBlockAttributes
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import (
    BlockStateManager,
    DiscardPolicy,
    RamDiscardListener,
    RamDiscardManager,
    default_policy,
)
from ramdiscard.units import GiB, KiB, MiB, TiB, format_size, parse_size

# The memory model sits below host memory; host RAM for ``MemoryRegion.new_ram(name, size)``
# is plugged in from here, the one place that sees both.
install_ram_factory(lambda size, name: RamBlock(size, name=name))

__all__ = [
    "AddressSpace",
    "BlockStateManager",
    "DiscardPolicy",
    "DiscardPolicyError",
    "GiB",
    "HostMemoryError",
    "InvalidArgument",
    "KiB",
    "ListenerError",
    "ManagerBusy",
    "MemoryListener",
    "MemoryRegion",
    "MemoryRegionSection",
    "MemorySystem",
    "MiB",
    "RamDiscardError",
    "RamDiscardListener",
    "RamBlockAttributes",
    "RamDiscardManager",
    "RegionKind",
    "RegionMapped",
    "TiB",
    "TopologyError",
    "VirtioMem",
    "default_policy",
    "default_system",
    "format_size",
    "parse_size",
    "transaction",
]
__version__ = "0.1.0"
