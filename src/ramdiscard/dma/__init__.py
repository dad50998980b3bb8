"""DMA pinning backends: hold host pages the way a device doing DMA would.

Rules: every backend implements :class:`DmaBackend` (see ``backend.py`` for the contract:
4 KiB-aligned ranges, all-or-nothing pins, handles, ``dma_read``, ``close``).

* :class:`IoUringDmaBackend`: real page pins (io_uring fixed buffers, like VFIO), counted
  in VmPin; a discard of pinned memory leaves a stale pin that still reads the old data.
* :class:`MlockDmaBackend`: mlock; resident and counted in VmLck, but not a page pin
  (the kernel refuses MADV_DONTNEED on it instead of going stale).
* :class:`NullDmaBackend`: bookkeeping only.

:func:`default_backend` picks io_uring when :func:`iouring_available` says it works,
else mlock (which needs RLIMIT_MEMLOCK or CAP_IPC_LOCK for large pins).
"""

from __future__ import annotations

from ramdiscard.dma.backend import PAGE_SIZE, BackendClosed, DmaBackend, PinHandle
from ramdiscard.dma.iouring import (
    MAX_BUFFER_BYTES,
    MAX_BUFFERS_PER_RING,
    IoUringDmaBackend,
    RawRing,
)
from ramdiscard.dma.iouring import available as iouring_available
from ramdiscard.dma.mlock import MlockDmaBackend
from ramdiscard.dma.null import NullDmaBackend


def default_backend() -> DmaBackend:
    """A new :class:`IoUringDmaBackend` if io_uring works here, else a
    :class:`MlockDmaBackend`. The caller owns it and must close it."""
    if iouring_available()[0]:
        return IoUringDmaBackend()
    return MlockDmaBackend()


__all__ = [
    "MAX_BUFFERS_PER_RING",
    "MAX_BUFFER_BYTES",
    "PAGE_SIZE",
    "BackendClosed",
    "DmaBackend",
    "IoUringDmaBackend",
    "MlockDmaBackend",
    "NullDmaBackend",
    "PinHandle",
    "RawRing",
    "default_backend",
    "iouring_available",
]
