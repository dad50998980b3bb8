"""A DMA backend that pins nothing: accounting and validation only.

Rules: same contract as every :class:`~ramdiscard.consumers.dma.backend.DmaBackend` (validation,
handles, ``pinned_bytes``), but no syscall is made, so no page is held and no fault
checkpoint is passed. ``dma_read`` reads the memory at the address as the CPU sees it now
(there is no separate device view), so the caller must keep the range mapped.

Use it in tests of higher layers on machines without io_uring, or where the cost or the
accounting of real pins is not wanted.
"""

from __future__ import annotations

import ctypes

from ramdiscard.consumers.dma.backend import DmaBackend, PinHandle


class NullDmaBackend(DmaBackend):
    """Bookkeeping-only backend; ``dma_read`` returns the live CPU view."""

    def _pin_impl(self, handle: PinHandle) -> None:
        pass

    def _unpin_impl(self, handle: PinHandle) -> None:
        pass

    def _dma_read_impl(self, handle: PinHandle, offset: int, length: int) -> bytes:
        return ctypes.string_at(handle.host_address + offset, length)

    def _close_impl(self) -> None:
        pass
