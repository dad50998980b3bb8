"""RAM-block DMA mapping: QEMU's nvme:// (vfio-helpers) consumer, with RamDiscardManagers.

* :class:`RamBlockDmaMapper`: every RAM block in a private IOVA space, pinned whole or, for
  managed regions, populated granule by granule; takes only the uncoordinated-disable
  count, so it runs beside virtio-mem.
* :class:`IovaAllocator`: first-fit, coalescing IOVA ranges.
* :class:`BlockDmaConsumer` / :func:`make_consumer`: the machine-scenario wrapper.
"""

from ramdiscard.consumers.blockdma.block import BlockStatus, MappingMode
from ramdiscard.consumers.blockdma.consumer import BlockDmaConsumer, make_consumer
from ramdiscard.consumers.blockdma.errors import IovaExhausted
from ramdiscard.consumers.blockdma.iova import IovaAllocator
from ramdiscard.consumers.blockdma.mapper import RamBlockDmaMapper
from ramdiscard.consumers.dma import make_backend  # the consumer's backend factory, by scenario name

__all__ = [
    "BlockDmaConsumer",
    "BlockStatus",
    "IovaAllocator",
    "IovaExhausted",
    "MappingMode",
    "RamBlockDmaMapper",
    "make_backend",
    "make_consumer",
]
