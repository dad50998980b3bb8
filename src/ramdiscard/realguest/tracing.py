"""The device event log of a real-guest run, in QEMU's trace-log format.

Rules: :class:`TraceRecorder` collects ``PID@SECONDS:event args`` lines (thread-safe);
:class:`TracingQueue` passes a :class:`~ramdiscard.interfaces.Virtqueue` through and
records each request (plug / unplug / unplug-all / state) as it is popped and each
response as it is pushed, both read with the device's own wire parsers; a request or
response they refuse is passed on unrecorded.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from ramdiscard.errors import RamDiscardError
from ramdiscard.interfaces import VirtqElement, Virtqueue
from ramdiscard.providers.virtio_mem.wire import Request, RequestType, Response

_REQUEST_EVENTS = {
    RequestType.PLUG: "virtio_mem_plug_request",
    RequestType.UNPLUG: "virtio_mem_unplug_request",
    RequestType.STATE: "virtio_mem_state_request",
}


class TraceRecorder:
    """Device events in QEMU's trace-log format (``PID@SECONDS:event args``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def add(self, event: str, args: str = "") -> None:
        with self._lock:
            self.lines.append(f"{os.getpid()}@{time.time():.6f}:{event} {args}".rstrip())

    def text(self) -> str:
        with self._lock:
            return "".join(line + "\n" for line in self.lines)


def _request(data: bytes) -> Request | None:
    """The request in ``data``, or None when the device would refuse it as malformed."""
    try:
        return Request.parse(data)
    except RamDiscardError:
        return None


class TracingQueue:
    """Passes a Virtqueue through, recording each request and response (module rules)."""

    def __init__(self, inner: Virtqueue, trace: TraceRecorder) -> None:
        self.inner, self.trace = inner, trace

    def pop(self) -> VirtqElement | None:
        element = self.inner.pop()
        req = None if element is None else _request(element.request)
        if req is not None:
            if req.type is RequestType.UNPLUG_ALL:
                self.trace.add("virtio_mem_unplug_all_request")
            else:
                self.trace.add(_REQUEST_EVENTS[req.type], f"addr=0x{req.addr:x} nb_blocks={req.nb_blocks}")
        return element

    def push(self, element: VirtqElement, response: bytes) -> None:
        self.inner.push(element, response)
        req = _request(element.request)
        with contextlib.suppress(RamDiscardError):
            resp = Response.parse(response, request=None if req is None else req.type)
            self.trace.add("virtio_mem_send_response", f"type={int(resp.type)}")
            if resp.state is not None:
                self.trace.add("virtio_mem_state_response", f"state={int(resp.state)}")

    def detach(self, element: VirtqElement) -> None:
        self.inner.detach(element)

    def notify(self) -> None:
        self.inner.notify()
