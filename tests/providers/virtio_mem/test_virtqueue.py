"""The virtio-mem request queue over a virtqueue: protocol violations (short request, response
buffer too small) break the device and change nothing; several elements per kick are
answered in order; the guest driver model talks to the device only through the queue."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.errors import InvalidArgument
from ramdiscard.guest import DriverState, GuestDriver
from ramdiscard.interfaces import MeasurableMemory, VirtqElement, Virtqueue
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.providers.virtio_mem import (
    REQUEST_SIZE,
    RESPONSE_SIZE,
    DeviceBroken,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMem,
)
from ramdiscard.units import MiB
from ramdiscard.virtqueue import LocalVirtqueue, QueueFull

from .conftest import ADDR, BS, Factory, RecordingListener

ACK = ResponseType.ACK


def whole(dev: VirtioMem) -> MemoryRegionSection:
    return MemoryRegionSection(dev.region, 0, dev.region_size, dev.addr)


def queue_of(dev: VirtioMem) -> LocalVirtqueue:
    return LocalVirtqueue(dev.process_queue)


def snapshot(dev: VirtioMem, rdl: RecordingListener, ram: Any) -> tuple[object, ...]:
    resident = ram.resident_bytes() if isinstance(ram, MeasurableMemory) else None
    return (dev.plugged_size, list(dev.plugged_ranges()), set(rdl.populated), list(rdl.events), resident)


def _prealloc_device(make: Factory, backing: str) -> tuple[VirtioMem, RecordingListener]:
    dev = make.device(32 * MiB, backing=backing, prealloc=True)
    rdl = RecordingListener()
    dev.register_listener(rdl, whole(dev))
    assert dev.plug(ADDR, 2) is ACK  # plugged (and resident, for real RAM) before the violation
    return dev, rdl


@pytest.mark.parametrize(
    ("request_bytes", "capacity", "match"),
    [
        (Request(RequestType.PLUG, ADDR + 4 * BS, 4).pack(), RESPONSE_SIZE - 1, "not enough space"),
        (Request(RequestType.UNPLUG, ADDR, 2).pack(), 0, "not enough space"),
        (Request(RequestType.UNPLUG_ALL).pack(), RESPONSE_SIZE - 1, "not enough space"),
        (Request(RequestType.PLUG, ADDR + 4 * BS, 4).pack()[:23], RESPONSE_SIZE, "request size"),
        (Request(RequestType.UNPLUG, ADDR, 2).pack()[:17], 64, "request size"),
    ],
    ids=["plug-resp9", "unplug-resp0", "unplug-all-resp9", "plug-req23", "unplug-req17"],
)
def test_violation_breaks_the_device_and_changes_nothing(
    make: Factory, backing: str, request_bytes: bytes, capacity: int, match: str
) -> None:
    dev, rdl = _prealloc_device(make, backing)
    ram = dev.ram
    before = snapshot(dev, rdl, ram)
    errors_before = dev.metrics.protocol_errors
    q = queue_of(dev)
    head = q.add(request_bytes, capacity)
    with pytest.raises(ProtocolError, match=match):
        q.kick()
    assert dev.broken
    assert dev.metrics.protocol_errors == errors_before + 1
    assert snapshot(dev, rdl, ram) == before
    # no used entry, the element came back detached, no interrupt for nothing
    assert q.get_used() is None and [e.head for e in q.detached] == [head] and q.notifications == 0
    # broken until reset: a valid request is not even popped
    q.add(Request(RequestType.STATE, ADDR, 1).pack(), RESPONSE_SIZE)
    with pytest.raises(DeviceBroken):
        q.kick()
    assert q.available == 1 and snapshot(dev, rdl, ram) == before
    dev.device_reset()
    q.kick()
    used = q.get_used()
    assert used is not None and used.length == RESPONSE_SIZE
    assert Response.parse(used.data, request=RequestType.STATE).type is ACK


def test_residency_is_unchanged_by_a_refused_plug(make: Factory, real_backing: str) -> None:
    """The refused PLUG would have preallocated 8 MiB; the refused UNPLUG would have freed 4 MiB."""
    dev, rdl = _prealloc_device(make, real_backing)
    ram = dev.ram
    assert isinstance(ram, MeasurableMemory)
    resident = ram.resident_bytes()
    assert resident >= 2 * BS
    refused = [Request(RequestType.PLUG, ADDR + 4 * BS, 4), Request(RequestType.UNPLUG, ADDR, 2)]
    for raw in (req.pack() for req in refused):
        q = queue_of(dev)
        q.add(raw, RESPONSE_SIZE - 1)
        with pytest.raises(ProtocolError):
            q.kick()
        assert ram.resident_bytes() == resident
        dev.device_reset()
    assert dev.plugged_size == 2 * BS and rdl.populated == {0, 1}


def test_several_elements_in_one_kick_in_order(make: Factory) -> None:
    dev = make.device(32 * MiB, requested_size=8 * MiB)
    rdl = RecordingListener()
    dev.register_listener(rdl, whole(dev))
    q = queue_of(dev)
    requests = [
        (Request(RequestType.PLUG, ADDR, 2), 10),
        (Request(RequestType.PLUG, ADDR, 1), 16),  # already plugged: ERROR
        (Request(RequestType.STATE, ADDR, 3), 4096),  # MIXED
        (Request(RequestType.UNPLUG, ADDR + BS, 1), 10),
        (Request(RequestType.PLUG, ADDR + 2 * BS, 8), 10),  # beyond requested_size: NACK
    ]
    heads = [q.add(req.pack(), cap) for req, cap in requests]
    q.kick()
    assert q.notifications == 1 and q.available == 0
    answers = []
    while (used := q.get_used()) is not None:
        answers.append((used.head, used.length, Response.parse(used.data, request=RequestType.STATE)))
    assert [a[0] for a in answers] == heads
    assert all(a[1] == RESPONSE_SIZE for a in answers)
    assert [a[2].type for a in answers] == [ACK, ResponseType.ERROR, ACK, ACK, ResponseType.NACK]
    assert answers[2][2].state is not None and answers[2][2].state.name == "MIXED"
    assert list(dev.plugged_ranges()) == [(0, BS)] and rdl.populated == {0}
    assert [e[0] for e in rdl.events] == ["populate", "discard"]


def test_a_violation_mid_kick_answers_those_before_and_leaves_those_after(make: Factory) -> None:
    dev = make.device(32 * MiB)
    q = queue_of(dev)
    first = q.add(Request(RequestType.PLUG, ADDR, 1).pack(), RESPONSE_SIZE)
    bad = q.add(Request(RequestType.PLUG, ADDR + BS, 1).pack(), RESPONSE_SIZE - 1)
    q.add(Request(RequestType.PLUG, ADDR + 2 * BS, 1).pack(), RESPONSE_SIZE)
    with pytest.raises(ProtocolError):
        q.kick()
    used = q.get_used()
    assert used is not None and used.head == first and used.length == RESPONSE_SIZE
    assert q.get_used() is None and [e.head for e in q.detached] == [bad] and q.notifications == 1
    assert q.available == 1 and list(dev.plugged_ranges()) == [(0, BS)]
    dev.device_reset()
    q.kick()
    used = q.get_used()
    assert used is not None and Response.parse(used.data).type is ACK
    assert list(dev.plugged_ranges()) == [(0, BS), (2 * BS, BS)]


def test_the_queue_refuses_what_a_ring_cannot_hold() -> None:
    def handler(vq: Virtqueue) -> None:
        element = vq.pop()
        assert element is not None
        with pytest.raises(InvalidArgument, match="does not fit"):
            vq.push(element, bytes(element.response_capacity + 1))
        vq.push(element, bytes(element.response_capacity))
        with pytest.raises(InvalidArgument, match="not in flight"):
            vq.push(element, b"")
        with pytest.raises(InvalidArgument, match="not in flight"):
            vq.detach(VirtqElement(element.head, element.request, element.response_capacity))

    q = LocalVirtqueue(handler, size=2)
    with pytest.raises(InvalidArgument):
        q.add(b"x", -1)
    q.add(b"a", 3)
    q.add(b"b", 3)
    with pytest.raises(QueueFull):
        q.add(b"c", 3)
    q.kick()
    used = q.get_used()
    assert used is not None and used.head == 0 and used.data == bytes(3)
    assert q.in_flight == 1 and q.add(b"c", 3) == 0  # the freed head is reused first


# Request types 0..3 are known; 4 and 0xFFFF are not (a protocol violation of the device's own).
_types = st.sampled_from([0, 1, 2, 3, 4, 0xFFFF])
_elements = st.tuples(
    _types,
    st.integers(0, 7),  # block index of addr
    st.integers(0, 4),  # nb_blocks
    st.integers(0, REQUEST_SIZE + 8),  # request length
    st.integers(0, RESPONSE_SIZE + 6),  # response capacity
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_elements, min_size=1, max_size=6))
def test_random_element_shapes_violation_or_response(shapes: list[tuple[int, int, int, int, int]]) -> None:
    """Prediction: the first element with a request shorter than 24 bytes, a response buffer
    under 10 bytes or an unknown type breaks the device (detached, nothing changed); every
    element before it gets exactly the response a twin device gives the same request, with
    used length 10; the ones after it stay available."""
    factory = Factory()
    try:
        dev = factory.device(16 * MiB, requested_size=8 * MiB)
        twin = factory.device(16 * MiB, requested_size=8 * MiB)
        q = queue_of(dev)
        elements = []
        for rtype, block, nb, length, capacity in shapes:
            raw = struct.pack("<H6xQH6x", rtype, ADDR + block * BS, nb) + b"\xa5" * 8
            elements.append((raw[:length], capacity, rtype))
            q.add(raw[:length], capacity)
        bad = [len(raw) < REQUEST_SIZE or cap < RESPONSE_SIZE or rtype > 3 for raw, cap, rtype in elements]
        violation = bad.index(True) if True in bad else None
        answered = elements if violation is None else elements[:violation]
        expected = [twin.handle_request(raw) for raw, _, _ in answered]
        if violation is None:
            q.kick()
        else:
            with pytest.raises(ProtocolError):
                q.kick()
        got = []
        while (used := q.get_used()) is not None:
            got.append(used)
        assert [u.data for u in got] == expected
        assert [u.head for u in got] == list(range(len(answered)))
        assert all(u.length == RESPONSE_SIZE for u in got)
        assert q.notifications == (1 if answered else 0)
        assert dev.broken is (violation is not None)
        assert [e.head for e in q.detached] == ([] if violation is None else [violation])
        assert q.available == (0 if violation is None else len(elements) - violation - 1)
        assert list(dev.plugged_ranges()) == list(twin.plugged_ranges())
        assert dev.plugged_size == twin.plugged_size
    finally:
        factory.close()


# -- the guest driver over the queue ------------------------------------------------------


def test_driver_requests_travel_through_the_queue(make: Factory) -> None:
    dev = make.device(512 * MiB, requested_size=256 * MiB)
    drv = GuestDriver(dev)
    exchanges = drv.run_until_converged()
    assert exchanges and drv.state is DriverState.CONVERGED
    assert drv.plugged_size == dev.plugged_size == 256 * MiB
    # one kick and one used-buffer notification per request, nothing left in flight
    assert drv.queue.notifications == len(exchanges) and drv.queue.in_flight == 0


class _SilentDevice:
    """Pops the request and never answers it (FC's behaviour for malformed chains)."""

    def __init__(self, dev: VirtioMem) -> None:
        self.dev = dev

    def config_bytes(self) -> bytes:
        return self.dev.config_bytes()

    def process_queue(self, vq: Virtqueue) -> None:
        element = vq.pop()
        assert element is not None
        vq.detach(element)


def test_driver_is_broken_by_a_device_that_raises_or_never_answers(make: Factory) -> None:
    dev = make.device(512 * MiB, requested_size=256 * MiB)
    silent = GuestDriver(_SilentDevice(dev))
    ex = silent.step()
    assert ex is not None and ex.response is None and silent.state is DriverState.BROKEN
    assert silent.broken_reason is not None and "without an answer" in silent.broken_reason
    assert silent.step() is None and dev.plugged_size == 0

    drv = GuestDriver(dev)
    dev.protocol_violation("test: broken before the driver's first request")
    ex = drv.step()
    assert ex is not None and ex.response is None and drv.state is DriverState.BROKEN
    assert drv.broken_reason is not None and "DeviceBroken" in drv.broken_reason
    assert dev.plugged_size == 0
