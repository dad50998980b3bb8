"""VirtioMemQueue: the virtio-mem "guest-request" queue handler over any virtqueue.

Rules (virtio-mem.md §3.1; QEMU's ``virtio_mem_handle_request``):

* :meth:`VirtioMemQueue.process` serves every available element of the queue in order:
  it pops one, answers it with the device's :meth:`~VirtioMem.handle_request` and pushes
  the 10-byte response (used length 10), then the next. After the last (or after a
  violation) it notifies the driver once if it pushed anything.
* Protocol violations, checked before the request reaches the device, in this order: a
  request shorter than 24 bytes; a response buffer smaller than 10 bytes; then the
  device's own (unknown request type). Any exception while serving an element detaches
  it, so every popped element is given back exactly once. The device becomes broken
  (:meth:`VirtioMem.protocol_violation`), the element is detached (no used entry, as
  QEMU's ``virtio_error`` path), nothing else changes (no block state, no listener
  notification, no host memory effect), elements after it stay available, and
  ProtocolError propagates after the notification for the elements already answered.
* A malformed ring (:class:`~ramdiscard.interfaces.VirtqueueError` from ``pop``) is a
  violation too: the device becomes broken, nothing was popped, ProtocolError propagates.
* While the device is broken nothing is popped and DeviceBroken is raised (QEMU's
  ``virtqueue_pop`` returns nothing for a broken device).
* Bytes of the request past the first 24 are ignored (D-*-1), as are response-buffer
  bytes past the first 10.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ramdiscard.interfaces import Virtqueue, VirtqueueError
from ramdiscard.providers.virtio_mem.wire import REQUEST_SIZE, RESPONSE_SIZE, DeviceBroken

if TYPE_CHECKING:
    from ramdiscard.providers.virtio_mem.device import VirtioMem


class VirtioMemQueue:
    """The request-queue side of ``device``; see the module rules."""

    def __init__(self, device: VirtioMem) -> None:
        self.device = device

    def process(self, vq: Virtqueue) -> int:
        """Serve every available element of ``vq``; returns how many were answered.

        Raises ProtocolError for a violating element (the device is broken, that element
        detached) and DeviceBroken if the device is broken (nothing popped).
        """
        dev = self.device
        answered = 0
        try:
            while True:
                if dev.broken:
                    raise DeviceBroken(f"virtio-mem {dev.id!r} is broken after a protocol violation")
                try:
                    element = vq.pop()
                except VirtqueueError as exc:
                    raise dev.protocol_violation(str(exc)) from exc
                if element is None:
                    return answered
                try:
                    if len(element.request) < REQUEST_SIZE:
                        raise dev.protocol_violation(
                            f"invalid request size: {len(element.request)} bytes, need {REQUEST_SIZE}"
                        )
                    if element.response_capacity < RESPONSE_SIZE:
                        raise dev.protocol_violation(
                            f"not enough space for the response: {element.response_capacity} bytes, "
                            f"need {RESPONSE_SIZE}"
                        )
                    response = dev.handle_request(element.request)
                except BaseException:
                    vq.detach(element)
                    raise
                vq.push(element, response)
                answered += 1
        finally:
            if answered:
                vq.notify()
