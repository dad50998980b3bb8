"""VirtioMemQueue: the virtio-mem "guest-request" queue handler over any virtqueue.

Rules (virtio-mem.md §3.1; QEMU's ``virtio_mem_handle_request``):

* :func:`serve` (and :meth:`VirtioMemQueue.process`) serves every available element of the queue in order:
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
* A ring the transport finds malformed (:class:`~ramdiscard.interfaces.VirtqueueError`
  from ``pop``) is a violation too: the device is broken, nothing was popped.
* While the device is broken nothing is popped and DeviceBroken is raised (QEMU's
  ``virtqueue_pop`` returns nothing for a broken device).
* Bytes of the request past the first 24 are ignored (D-*-1), as are response-buffer
  bytes past the first 10.
"""

from __future__ import annotations

from typing import Protocol

from ramdiscard.interfaces import Virtqueue, VirtqueueError
from ramdiscard.providers.virtio_mem.wire import REQUEST_SIZE, RESPONSE_SIZE, DeviceBroken, ProtocolError


class RequestHandler(Protocol):
    """What serving a queue needs of the device (:class:`~.device.VirtioMem` is one)."""

    @property
    def id(self) -> str: ...

    @property
    def broken(self) -> bool: ...

    def handle_request(self, request: bytes | bytearray | memoryview) -> bytes:
        """The 10-byte response to one 24-byte request (the device's own checks)."""
        ...

    def protocol_violation(self, reason: str) -> ProtocolError:
        """Break the device for ``reason``; returns the error to raise."""
        ...


def serve(device: RequestHandler, vq: Virtqueue) -> int:
    """Serve every available element of ``vq`` with ``device``; returns how many were
    answered (see the module rules).

    Raises ProtocolError for a violating element (the device is broken, that element
    detached) and DeviceBroken if the device is broken (nothing popped).
    """
    answered = 0
    handle = device.handle_request
    try:
        while not device.broken:
            try:
                element = vq.pop()
            except VirtqueueError as exc:
                raise device.protocol_violation(str(exc)) from exc
            if element is None:
                return answered
            request = element.request
            if len(request) < REQUEST_SIZE:
                vq.detach(element)
                raise device.protocol_violation(
                    f"invalid request size: {len(request)} bytes, need {REQUEST_SIZE}"
                )
            if element.response_capacity < RESPONSE_SIZE:
                vq.detach(element)
                capacity = element.response_capacity
                raise device.protocol_violation(
                    f"not enough space for the response: {capacity} bytes, need {RESPONSE_SIZE}"
                )
            try:
                response = handle(request)
            except BaseException:
                vq.detach(element)
                raise
            vq.push(element, response)
            answered += 1
        raise DeviceBroken(f"virtio-mem {device.id!r} is broken after a protocol violation")
    finally:
        if answered:
            vq.notify()


class VirtioMemQueue:
    """The request-queue side of ``device`` as an object (e.g. for a vhost-user backend
    that keeps one per queue); :meth:`process` is :func:`serve`."""

    def __init__(self, device: RequestHandler) -> None:
        self.device = device

    def process(self, vq: Virtqueue) -> int:
        """:func:`serve` ``vq`` with this queue's device."""
        return serve(self.device, vq)
