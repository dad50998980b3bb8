"""ramdiscard: QEMU's RamDiscardManager system in Python, on real host memory.

The names here are what a user of the library needs; each lives in the package named in
its group (the layout is described in docs/architecture.md):

* memory model (:mod:`ramdiscard.memory`): regions, sections, address spaces, listeners;
* the RamDiscardManager contract (:mod:`ramdiscard.rdm`): managers, listeners, the
  aggregate of several providers, the discard policy;
* host memory (:mod:`ramdiscard.hostmem`): real RAM blocks (anonymous, memfd, file, hugetlb);
* providers (:mod:`ramdiscard.providers`): virtio-mem, guest_memfd attributes;
* consumers (:mod:`ramdiscard.consumers`): the vfio-style DMA container, the DMA pinning
  backends, KVM memslots;
* the error taxonomy (:mod:`ramdiscard.errors`);
* sizes (:mod:`ramdiscard.units`).
"""

from ramdiscard.consumers.dma import (
    DmaBackend,
    IoUringDmaBackend,
    MlockDmaBackend,
    NullDmaBackend,
    default_backend,
    make_backend,
)
from ramdiscard.consumers.kvm import KvmMemslots
from ramdiscard.consumers.vfio import VfioContainer, VfioError
from ramdiscard.errors import (
    DiscardPolicyError,
    HostError,
    HostMemoryError,
    InvalidArgument,
    InvalidState,
    ListenerError,
    ListenerFailure,
    ManagerBusy,
    ProtocolViolation,
    RamDiscardError,
    RegionMapped,
    ResourceExhausted,
)
from ramdiscard.hostmem import Backing, RamBlock
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
from ramdiscard.providers.virtio_mem import DeviceBroken, ProtocolError, StateError, VirtioMem
from ramdiscard.rdm import (
    AggregateManager,
    BlockStateManager,
    DiscardPolicy,
    RamDiscardListener,
    RamDiscardManager,
    default_policy,
)
from ramdiscard.rdm.notify import DiscardNotificationError
from ramdiscard.units import GiB, KiB, MiB, TiB, format_size, parse_size

# The memory model sits below host memory; host RAM for ``MemoryRegion.new_ram(name, size)``
# is plugged in from here, the one place that sees both.
install_ram_factory(lambda size, name: RamBlock(size, name=name))

__all__ = [
    "AddressSpace",
    "AggregateManager",
    "Backing",
    "BlockStateManager",
    "DeviceBroken",
    "DiscardNotificationError",
    "DiscardPolicy",
    "DiscardPolicyError",
    "DmaBackend",
    "GiB",
    "HostError",
    "HostMemoryError",
    "InvalidArgument",
    "InvalidState",
    "IoUringDmaBackend",
    "KiB",
    "KvmMemslots",
    "ListenerError",
    "ListenerFailure",
    "ManagerBusy",
    "MemoryListener",
    "MemoryRegion",
    "MemoryRegionSection",
    "MemorySystem",
    "MiB",
    "MlockDmaBackend",
    "NullDmaBackend",
    "ProtocolError",
    "ProtocolViolation",
    "RamBlock",
    "RamBlockAttributes",
    "RamDiscardError",
    "RamDiscardListener",
    "RamDiscardManager",
    "RegionKind",
    "RegionMapped",
    "ResourceExhausted",
    "StateError",
    "TiB",
    "TopologyError",
    "VfioContainer",
    "VfioError",
    "VirtioMem",
    "default_backend",
    "default_policy",
    "default_system",
    "format_size",
    "make_backend",
    "parse_size",
    "transaction",
]
__version__ = "0.1.0"
