"""vfio-style DMA containers: type1-v2 mapping semantics with real pins, listening to
RamDiscardManagers so only populated memory is pinned (qemu-ram-discard §4.1).

* :mod:`~ramdiscard.consumers.vfio.table`: the IOVA mapping table (sans-I/O).
* :mod:`~ramdiscard.consumers.vfio.limits`: QEMU's DMA-mapping sanity check (sans-I/O).
* :mod:`~ramdiscard.consumers.vfio.mappings`: the mapping table with a pin per mapping.
* :mod:`~ramdiscard.consumers.vfio.sections`: per-section records and the RDM listener.
* :mod:`~ramdiscard.consumers.vfio.container`: :class:`VfioContainer`.
* :mod:`~ramdiscard.bench.vfio`: the plug/unplug benchmark against raw syscalls.

The DMA backends of :mod:`ramdiscard.consumers.dma` are re-exported for convenience.
"""

from ramdiscard.consumers.dma import IoUringDmaBackend, MlockDmaBackend, NullDmaBackend
from ramdiscard.consumers.vfio.container import DEFAULT_MAX_MAPPINGS, IommuPinWarning, VfioContainer
from ramdiscard.consumers.vfio.errors import (
    ContainerStateError,
    DmaLimitError,
    IommuMapRefused,
    MappingConflict,
    MappingLimitError,
    UnmapSplitError,
    VfioError,
)
from ramdiscard.consumers.vfio.limits import (
    RdmRange,
    check_dma_limit,
    smallest_granularity,
    worst_case_mappings,
)
from ramdiscard.consumers.vfio.mappings import IOMMU_PAGE_SIZE, DmaMapping
from ramdiscard.consumers.vfio.sections import PlainSection, RdmSection

__all__ = [
    "DEFAULT_MAX_MAPPINGS",
    "IOMMU_PAGE_SIZE",
    "ContainerStateError",
    "DmaLimitError",
    "DmaMapping",
    "IommuMapRefused",
    "IommuPinWarning",
    "IoUringDmaBackend",
    "MappingConflict",
    "MappingLimitError",
    "MlockDmaBackend",
    "NullDmaBackend",
    "PlainSection",
    "RdmRange",
    "RdmSection",
    "UnmapSplitError",
    "VfioContainer",
    "VfioError",
    "check_dma_limit",
    "smallest_granularity",
    "worst_case_mappings",
]
