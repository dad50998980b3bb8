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
from ramdiscard.memory import (
    AddressSpace,
    MemoryListener,
    MemoryRegion,
    MemoryRegionSection,
    RegionKind,
    TopologyError,
    transaction,
)
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
    "format_size",
    "parse_size",
    "transaction",
]
__version__ = "0.1.0"
