"""SplitRing over a real memory table: the normal path and hostile drivers."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import Virtqueue, VirtqueueError
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.providers.virtio_mem.wire import DeviceBroken, ProtocolError
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB
from ramdiscard.vhost_user.memtable import MemoryTable, MemTableError
from ramdiscard.vhost_user.split_ring import MAX_REQUEST_BYTES, RingSetupError, SplitRing
from ramdiscard.vhost_user.wire import MemRegion

from .conftest import AVAIL, DESC, GPA_BASE, MEM_SIZE, NUM, USED, Driver


def ring(memory: MemoryTable, signal: list[int] | None = None) -> SplitRing:
    calls = signal if signal is not None else []
    return SplitRing(memory, num=NUM, desc=DESC, avail=AVAIL, used=USED, signal=lambda: calls.append(1))


def test_is_a_virtqueue(memory: MemoryTable) -> None:
    assert isinstance(ring(memory), Virtqueue)


def test_pop_push_roundtrip(memory: MemoryTable, driver: Driver) -> None:
    signals: list[int] = []
    vq = ring(memory, signals)
    assert vq.pop() is None
    inb = driver.add(0, b"R" * 24, 10)
    element = vq.pop()
    assert element is not None
    assert (element.head, element.request, element.response_capacity) == (0, b"R" * 24, 10)
    vq.push(element, b"0123456789")
    vq.notify()
    assert memory.read(inb, 10) == b"0123456789"
    assert driver.used() == [(0, 10)]
    assert signals == [1] and vq.last_avail_idx == 1


def test_response_scattered_over_writable_descriptors(memory: MemoryTable, driver: Driver) -> None:
    vq = ring(memory)
    out, a, b = driver.buffer(b"x" * 24), driver.buffer(4), driver.buffer(6)
    driver.desc(0, out, 24, 1, 1)
    driver.desc(1, a, 4, 3, 2)
    driver.desc(2, b, 6, 2, 0)
    driver.publish(0)
    element = vq.pop()
    assert element is not None and element.response_capacity == 10
    vq.push(element, b"abcdefghij")
    assert memory.read(a, 4) == b"abcd" and memory.read(b, 6) == b"efghij"


def test_oversized_response_refused_and_nothing_written(memory: MemoryTable, driver: Driver) -> None:
    vq = ring(memory)
    inb = driver.add(0, b"R" * 24, 4)
    element = vq.pop()
    assert element is not None
    with pytest.raises(InvalidArgument, match="does not fit"):
        vq.push(element, b"123456")
    assert memory.read(inb, 4) == bytes(4) and driver.used() == []
    vq.detach(element)
    with pytest.raises(InvalidArgument, match="not in flight"):
        vq.push(element, b"")


def test_no_interrupt_flag_suppresses_signal(memory: MemoryTable) -> None:
    signals: list[int] = []
    vq = ring(memory, signals)
    memory.write(AVAIL, struct.pack("<H", 1))
    vq.notify()
    assert signals == []


def _broken(vq: SplitRing, match: str) -> None:
    with pytest.raises(VirtqueueError, match=match):
        vq.pop()
    assert vq.broken and vq.last_avail_idx == 0 and vq.in_flight == 0
    with pytest.raises(VirtqueueError):
        vq.pop()


def test_loop_is_a_violation(memory: MemoryTable, driver: Driver) -> None:
    driver.desc(0, driver.buffer(24), 24, 1, 1)
    driver.desc(1, driver.buffer(24), 24, 1, 0)
    driver.publish(0)
    _broken(ring(memory), "loop")


def test_descriptor_outside_memory_is_a_violation(memory: MemoryTable, driver: Driver) -> None:
    driver.desc(0, GPA_BASE + MEM_SIZE - 8, 24, 0, 0)
    driver.publish(0)
    _broken(ring(memory), "outside the memory table")


def test_readable_after_writable_is_a_violation(memory: MemoryTable, driver: Driver) -> None:
    driver.desc(0, driver.buffer(10), 10, 3, 1)
    driver.desc(1, driver.buffer(24), 24, 0, 0)
    driver.publish(0)
    _broken(ring(memory), "readable after device-writable")


@pytest.mark.parametrize(
    ("flags", "nxt", "match"), [(4, 0, "indirect"), (8, 0, "unknown flags"), (1, NUM, "next")]
)
def test_bad_descriptor_fields(memory: MemoryTable, driver: Driver, flags: int, nxt: int, match: str) -> None:
    driver.desc(0, driver.buffer(24), 24, flags, nxt)
    driver.publish(0)
    _broken(ring(memory), match)


def test_avail_index_jump_and_bad_head(memory: MemoryTable, driver: Driver) -> None:
    memory.write(AVAIL + 2, struct.pack("<H", NUM + 1))
    _broken(ring(memory), "ahead")
    memory.write(AVAIL + 2, struct.pack("<H", 1))
    memory.write(AVAIL + 4, struct.pack("<H", NUM))
    _broken(ring(memory), "head")


def test_request_size_cap(memory: MemoryTable, driver: Driver) -> None:
    for i in range(NUM):
        driver.desc(i, GPA_BASE, MAX_REQUEST_BYTES // 4 + 1, 1 if i < NUM - 1 else 0, i + 1)
    driver.publish(0)
    _broken(ring(memory), "device-readable bytes")


def test_setup_checks(memory: MemoryTable) -> None:
    with pytest.raises(RingSetupError, match="power of two"):
        SplitRing(memory, num=6, desc=DESC, avail=AVAIL, used=USED)
    with pytest.raises(RingSetupError, match="misaligned"):
        SplitRing(memory, num=NUM, desc=DESC + 8, avail=AVAIL, used=USED)
    with pytest.raises(RingSetupError, match="used ring"):
        SplitRing(memory, num=NUM, desc=DESC, avail=AVAIL, used=GPA_BASE + MEM_SIZE - 8)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    table=st.binary(min_size=16 * NUM, max_size=16 * NUM),
    avail=st.binary(min_size=4 + 2 * NUM, max_size=4 + 2 * NUM),
    aimed=st.lists(st.tuples(st.integers(0, NUM - 1), st.integers(0, MEM_SIZE + 64)), max_size=NUM),
)
def test_hostile_ring_never_escapes(
    memory: MemoryTable, table: bytes, avail: bytes, aimed: list[tuple[int, int]]
) -> None:
    memory.write(DESC, table)
    for index, offset in aimed:  # make some addresses land near and across the edges
        memory.write(DESC + 16 * index, struct.pack("<Q", GPA_BASE + offset))
    memory.write(AVAIL, avail)
    memory.write(USED, bytes(4 + 8 * NUM + 2))
    vq = ring(memory)
    popped = 0
    for _ in range(NUM + 1):
        try:
            element = vq.pop()
        except VirtqueueError as exc:
            assert "\n" not in str(exc) and vq.broken
            break
        if element is None:
            break
        popped += 1
        assert len(element.request) <= MAX_REQUEST_BYTES
        vq.push(element, bytes(min(element.response_capacity, 10)))
    assert popped <= NUM and vq.in_flight == 0


def test_memtable_refuses_bad_tables() -> None:
    fd = os.memfd_create("vhost-test-table")
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(MemTableError, match="overlap"):
            MemoryTable.from_regions([MemRegion(0, 8192, 0, 0), MemRegion(4096, 4096, 1 << 20, 0)], [fd, fd])
        with pytest.raises(MemTableError, match="past its file"):
            MemoryTable.from_regions([MemRegion(0, 1 << 17, 0, 0)], [fd])
        with pytest.raises(MemTableError, match="page aligned"):
            MemoryTable.from_regions([MemRegion(0, 4096, 0, 100)], [fd])
    finally:
        os.close(fd)


def test_garbage_ring_breaks_the_device_not_the_process(memory: MemoryTable, driver: Driver) -> None:
    policy = DiscardPolicy()
    region = MemoryRegion.new_ram("vmem-ram", 64 * MiB)
    dev = VirtioMem(region, addr=1 << 32, block_size=2 * MiB, requested_size=8 * MiB, policy=policy)
    try:
        vq = ring(memory)
        driver.desc(0, driver.buffer(24), 24, 1, 0)
        driver.publish(0)
        with pytest.raises(ProtocolError, match="loop"):
            dev.process_queue(vq)
        assert dev.broken and dev.plugged_size == 0
        with pytest.raises(DeviceBroken):
            dev.process_queue(vq)
    finally:
        dev.unrealize()
