"""The device event log of a real-guest run, in QEMU's trace-log format.

Rules: :class:`TraceRecorder` collects ``PID@SECONDS:event args`` lines (thread-safe);
:class:`TracingQueue` passes a :class:`~ramdiscard.interfaces.Virtqueue` through and
records each request (plug / unplug / unplug-all / state) as it is popped and each
response as it is pushed; a request it cannot parse is passed on unrecorded.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time

from ramdiscard.errors import RamDiscardError
from ramdiscard.interfaces import VirtqElement, Virtqueue
from ramdiscard.providers.virtio_mem.wire import Request, RequestType, ResponseType


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


class TracingQueue:
    """Passes a Virtqueue through, recording each request and response."""

    def __init__(self, inner: Virtqueue, trace: TraceRecorder) -> None:
        self.inner, self.trace = inner, trace

    def pop(self) -> VirtqElement | None:
        element = self.inner.pop()
        if element is not None and len(element.request) >= 24:
            with contextlib.suppress(RamDiscardError, ValueError):
                req = Request.parse(element.request)
                names = {
                    RequestType.PLUG: "virtio_mem_plug_request",
                    RequestType.UNPLUG: "virtio_mem_unplug_request",
                    RequestType.STATE: "virtio_mem_state_request",
                }
                if req.type is RequestType.UNPLUG_ALL:
                    self.trace.add("virtio_mem_unplug_all_request")
                elif req.type in names:
                    self.trace.add(names[req.type], f"addr=0x{req.addr:x} nb_blocks={req.nb_blocks}")
        return element

    def push(self, element: VirtqElement, response: bytes) -> None:
        self.inner.push(element, response)
        if len(response) >= 2:
            (rtype,) = struct.unpack_from("<H", response)
            self.trace.add("virtio_mem_send_response", f"type={rtype}")
            state_request = struct.unpack_from("<H", element.request)[0] == RequestType.STATE
            if rtype == ResponseType.ACK and state_request and len(response) >= 10:
                state = struct.unpack_from("<H", response, 8)[0]
                self.trace.add("virtio_mem_state_response", f"state={state}")

    def detach(self, element: VirtqElement) -> None:
        self.inner.detach(element)

    def notify(self) -> None:
        self.inner.notify()
