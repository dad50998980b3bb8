"""virtio-mem: the device model that provides a RamDiscardManager for its memory.

* :mod:`~ramdiscard.providers.virtio_mem.wire`: request/response/config layouts (sans-I/O).
* :mod:`~ramdiscard.providers.virtio_mem.state`: :class:`PlugState`, the sans-I/O plug-state
  core (bitmap, sizes, request -> decision).
* :mod:`~ramdiscard.providers.virtio_mem.config`: property checks, defaults, memslot geometry.
* :mod:`~ramdiscard.providers.virtio_mem.effects`: host memory, memslots and the effect order.
* :mod:`~ramdiscard.providers.virtio_mem.device`: :class:`VirtioMem`, the device, which is the
  RamDiscardManager of its region and drives the core.
* :mod:`~ramdiscard.providers.virtio_mem.persist`: the state image codec (``save``/``restore``).
* :mod:`~ramdiscard.providers.virtio_mem.metrics`: per-device counters.
* :mod:`~ramdiscard.replay.trace`: QEMU trace parsing and replay.
"""

from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.providers.virtio_mem.config import (
    USABLE_EXTENT_X86,
    FeatureError,
    default_block_size,
    memslot_geometry,
)
from ramdiscard.providers.virtio_mem.device import VirtioMem
from ramdiscard.providers.virtio_mem.metrics import VirtioMemMetrics
from ramdiscard.providers.virtio_mem.persist import StateError, StateImage, decode_state, encode_state
from ramdiscard.providers.virtio_mem.state import Action, Decision, PlugState
from ramdiscard.providers.virtio_mem.wire import (
    CONFIG_SIZE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    VIRTIO_ID_MEM,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    ConfigSpace,
    DeviceBroken,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMemError,
)

__all__ = [
    "Action",
    "Decision",
    "PlugState",
    "CONFIG_SIZE",
    "REQUEST_SIZE",
    "RESPONSE_SIZE",
    "USABLE_EXTENT_X86",
    "VIRTIO_ID_MEM",
    "VIRTIO_MEM_F_ACPI_PXM",
    "VIRTIO_MEM_F_PERSISTENT_SUSPEND",
    "VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE",
    "BlockState",
    "ConfigSpace",
    "DeviceBroken",
    "FeatureError",
    "HostRam",
    "ProtocolError",
    "Request",
    "RequestType",
    "Response",
    "ResponseType",
    "StateError",
    "StateImage",
    "VirtioMem",
    "VirtioMemError",
    "VirtioMemMetrics",
    "decode_state",
    "default_block_size",
    "encode_state",
    "memslot_geometry",
]
