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
:func:`make_backend` makes one by its scenario name (``BACKENDS``).
:func:`stale_pinned_bytes` is how much of a pinned range the process no longer has
resident: memory discarded under a live pin, which the pin keeps from being freed.
"""

from __future__ import annotations

from ramdiscard.consumers.dma.backend import PAGE_SIZE, BackendClosed, DmaBackend, PinHandle
from ramdiscard.consumers.dma.iouring import MAX_BUFFER_BYTES, MAX_BUFFERS_PER_RING, IoUringDmaBackend
from ramdiscard.consumers.dma.iouring import available as iouring_available
from ramdiscard.consumers.dma.mlock import MlockDmaBackend
from ramdiscard.consumers.dma.null import NullDmaBackend
from ramdiscard.consumers.dma.rawring import RawRing
from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import DmaPinner, MeasurableMemory

BACKENDS = ("auto", "io_uring", "mlock", "null")


def default_backend() -> DmaBackend:
    """A new :class:`IoUringDmaBackend` if io_uring works here, else a
    :class:`MlockDmaBackend`. The caller owns it and must close it."""
    if iouring_available()[0]:
        return IoUringDmaBackend()
    return MlockDmaBackend()


def make_backend(kind: str) -> DmaBackend:
    """A new backend by name: ``auto`` (:func:`default_backend`), ``io_uring``, ``mlock``
    or ``null``. Raises InvalidArgument for another name, the backend's error when it
    cannot be created here. The caller owns it and must close it."""
    if kind == "auto":
        return default_backend()
    if kind == "io_uring":
        return IoUringDmaBackend()
    if kind == "mlock":
        return MlockDmaBackend()
    if kind == "null":
        return NullDmaBackend()
    raise InvalidArgument(f"unknown DMA backend {kind!r}; expected one of {', '.join(BACKENDS)}")


def stale_pinned_bytes(backend: DmaPinner, ram: object, offset: int, size: int) -> int:
    """Bytes of ``ram[offset, +size)``, pinned through ``backend``, that are not resident
    (discarded while pinned: the pin still holds those pages). 0 for a NullDmaBackend
    (nothing is really held) or RAM that is not :class:`MeasurableMemory`."""
    if isinstance(backend, NullDmaBackend) or not isinstance(ram, MeasurableMemory):
        return 0
    return max(0, size - int(ram.resident_bytes(offset, size)))


__all__ = [
    "BACKENDS",
    "MAX_BUFFERS_PER_RING",
    "MAX_BUFFER_BYTES",
    "PAGE_SIZE",
    "BackendClosed",
    "DmaBackend",
    "DmaPinner",
    "IoUringDmaBackend",
    "MlockDmaBackend",
    "NullDmaBackend",
    "PinHandle",
    "RawRing",
    "default_backend",
    "iouring_available",
    "make_backend",
    "stale_pinned_bytes",
]
