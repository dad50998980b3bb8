"""TracingQueue records requests and responses in QEMU's trace-log format, read with the
device's wire parsers; malformed bytes pass through unrecorded."""

from __future__ import annotations

from ramdiscard.interfaces import VirtqElement
from ramdiscard.providers.virtio_mem.wire import (
    BlockState,
    Request,
    RequestType,
    Response,
    ResponseType,
)
from ramdiscard.realguest.tracing import TraceRecorder, TracingQueue


class ListQueue:
    """The inner queue: hands out the given elements, keeps what was pushed."""

    def __init__(self, requests: list[bytes]) -> None:
        self.todo = [VirtqElement(i, r, 10) for i, r in enumerate(requests)]
        self.pushed: list[tuple[int, bytes]] = []
        self.detached: list[int] = []
        self.notified = 0

    def pop(self) -> VirtqElement | None:
        return self.todo.pop(0) if self.todo else None

    def push(self, element: VirtqElement, response: bytes) -> None:
        self.pushed.append((element.head, response))

    def detach(self, element: VirtqElement) -> None:
        self.detached.append(element.head)

    def notify(self) -> None:
        self.notified += 1


def _events(trace: TraceRecorder) -> list[str]:
    return [line.split(":", 1)[1] for line in trace.text().splitlines()]


def test_requests_and_responses_are_recorded_and_passed_through() -> None:
    plug = Request(RequestType.PLUG, 0x1_0020_0000, 3).pack()
    state = Request(RequestType.STATE, 0x1_0000_0000, 1).pack()
    inner = ListQueue([plug, state, Request(RequestType.UNPLUG_ALL).pack()])
    trace = TraceRecorder()
    q = TracingQueue(inner, trace)
    a, b, c = q.pop(), q.pop(), q.pop()
    assert a is not None and b is not None and c is not None and q.pop() is None
    q.push(a, Response(ResponseType.NACK).pack())
    q.push(b, Response(ResponseType.ACK, BlockState.MIXED).pack())
    q.notify()
    assert _events(trace) == [
        "virtio_mem_plug_request addr=0x100200000 nb_blocks=3",
        "virtio_mem_state_request addr=0x100000000 nb_blocks=1",
        "virtio_mem_unplug_all_request",
        "virtio_mem_send_response type=1",
        "virtio_mem_send_response type=0",
        "virtio_mem_state_response state=2",
    ]
    assert [h for h, _ in inner.pushed] == [0, 1] and inner.notified == 1


def test_malformed_bytes_pass_through_unrecorded() -> None:
    short, unknown = b"\x00" * 5, b"\x09" + bytes(23)
    inner = ListQueue([short, unknown])
    trace = TraceRecorder()
    q = TracingQueue(inner, trace)
    a, b = q.pop(), q.pop()
    assert a is not None and b is not None
    q.detach(a)
    q.push(b, b"\x01")
    assert trace.text() == ""
    assert inner.detached == [0] and inner.pushed == [(1, b"\x01")]
