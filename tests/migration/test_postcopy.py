"""Postcopy over real sockets with a separate fault-handler process, guests writing on
both ends: every page arrives, unplugged memory stays local, failures are handled."""

from __future__ import annotations

import contextlib
import ctypes
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ramdiscard.guest.writer import DeviceTarget, GuestWriter
from ramdiscard.migration import MigrationError
from ramdiscard.migration import postcopy_wire as w
from ramdiscard.migration.postcopy_dest import PostcopyDestStats, receive_postcopy
from ramdiscard.migration.postcopy_source import PostcopySource
from ramdiscard.migration.stream import StreamError
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh
from tests.migration.machine import Machine

BLOCKS = [0, 1, 2, 5, 6, 9, 20, 21, 22, 23, 40, 63]
PAGE = 4096


def _wait(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


class Run:
    """A source and a destination machine, a writer on each, a postcopy between them."""

    def __init__(self, machines: Machines, backing: str, preempt: bool = True) -> None:
        self.src = machines(128 * MiB, backing=backing)
        self.dst = machines(128 * MiB, backing=backing)
        self.src.plug_blocks(BLOCKS)
        self.src.fill(3)
        src_target = DeviceTarget(self.src.dev, self.src.ram)
        self.swriter = GuestWriter([src_target], threading.RLock(), rate=50 * MiB)
        self.dwriter = GuestWriter(
            [DeviceTarget(self.dst.dev, self.dst.ram)], threading.RLock(), rate=50 * MiB, seed=9
        )
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.port = self.ls.getsockname()[1]
        self.out: dict[str, Any] = {}
        self.running = threading.Event()
        self.on_running: Callable[[], None] = lambda: None
        self.source = PostcopySource(
            self.src.space, self.src.devices, "127.0.0.1", self.port, self.swriter, preempt=preempt,
            timeout=30, io_timeout=10,
        )  # fmt: skip

    def touch_last_plugged(self) -> None:
        """A destination guest read of the last plugged page (the background copy sends it
        last): it faults unless the page came on request already."""
        buf = ctypes.create_string_buffer(PAGE)
        ctypes.memmove(buf, self.dst.ram.host_address + (BLOCKS[-1] + 1) * self.src.block - PAGE, PAGE)

    def _receive(self) -> None:
        try:
            conn, _peer = self.ls.accept()
            with conn:
                pre = conn.recv(len(w.MAIN_PREAMBLE), socket.MSG_WAITALL)
                assert pre == w.MAIN_PREAMBLE

                def running() -> None:
                    self.dwriter.start()
                    self.running.set()
                    self.on_running()

                self.out["stats"] = receive_postcopy(
                    conn, self.ls, self.dst.space, self.dst.devices, io_timeout=10,
                    on_running=running, on_failure=self.dwriter.stop,
                )  # fmt: skip
        except BaseException as exc:
            self.out["error"] = exc

    @contextlib.contextmanager
    def going(self) -> Iterator[threading.Thread]:
        rx = threading.Thread(target=self._receive, daemon=True)
        rx.start()
        self.swriter.start()
        _wait(lambda: self.swriter.pages_written > 300)
        tx = threading.Thread(target=self._send, daemon=True)
        tx.start()
        try:
            yield tx
        finally:
            tx.join(60)
            rx.join(60)
            self.swriter.stop()
            self.dwriter.stop()
            self.ls.close()

    def _send(self) -> None:
        try:
            self.out["src"] = self.source.run()
        except BaseException as exc:
            self.out["src_error"] = exc


def _differing_pages(src: Machine, dst: Machine) -> list[tuple[int, int, bytes]]:
    """(offset, ordinal among plugged pages, destination content) of every plugged page
    whose content differs between the two machines."""
    out = []
    ordinal = 0
    for start, size in src.dev.plugged_ranges():
        for off in range(start, start + size, PAGE):
            a, b = src.ram.view[off : off + PAGE], dst.ram.view[off : off + PAGE]
            if a != b:
                out.append((off, ordinal, bytes(b)))
            ordinal += 1
    return out


def test_postcopy_with_writers_on_both_ends(machines: Machines, backing: str) -> None:
    run = Run(machines, backing)
    run.source.max_bandwidth = 32 * MiB  # the destination guest writes while pages are missing
    probe = ctypes.create_string_buffer(PAGE)
    unplugged = run.dst.ram.host_address + 30 * run.src.block + 5 * PAGE

    busy: list[bool] = []

    def touch_unplugged() -> None:  # a stray guest read of an unplugged block, mid-postcopy
        busy.append(run.dst.dev.is_busy())
        ctypes.memmove(probe, unplugged, PAGE)
        run.touch_last_plugged()

    run.on_running = touch_unplugged
    with run.going():
        _wait(lambda: run.source.stats.status == "active")
        assert run.swriter.pages_written > 0 and not run.swriter.paused
        run.source.start.set()
    assert "error" not in run.out and "src_error" not in run.out, run.out
    st = run.out["src"]
    dst: PostcopyDestStats = run.out["stats"]
    assert st.status == "completed" and run.swriter.paused
    assert busy == [True] and not run.dst.dev.is_busy() and not run.src.dev.is_busy()
    assert run.src.resident_outside_plugged() == 0  # the source never read discarded memory
    assert st.unplugged_requests == 0
    assert dst.zero_faults >= 1 and probe.raw == bytes(PAGE)
    assert st.total_bytes == len(BLOCKS) * run.src.block + 4 * MiB
    # Every page still needed at the switchover went out once (background) or more (requests).
    assert st.background_bytes <= st.needed_bytes <= st.background_bytes + st.request_bytes
    assert run.dwriter.pages_written > 0
    assert dst.faults >= 1 and len(dst.latencies) >= 1
    assert list(run.dst.dev.plugged_ranges()) == list(run.src.dev.plugged_ranges())
    # Every page is the source's, except pages the destination's guest wrote afterwards.
    assert run.dst.low is not None and run.src.low is not None
    assert run.dst.low.view == run.src.low.view
    diff = _differing_pages(run.src, run.dst)
    assert len(diff) <= run.dwriter.pages_written
    for off, ordinal, data in diff:
        seq, page = struct.unpack_from("<QQ", data)
        ok = seq > 0 and page == ordinal and data[16:] == bytes(PAGE - 16)
        assert ok, f"page {off:#x} is neither the source's nor a destination guest write"
    assert run.dst.resident_outside_plugged() == 0  # the zero page placed there was dropped


def test_postcopy_without_preempt_answers_on_the_main_channel(machines: Machines) -> None:
    run = Run(machines, "anonymous", preempt=False)
    run.source.max_bandwidth = 64 * MiB
    run.on_running = run.touch_last_plugged
    with run.going():
        _wait(lambda: run.source.stats.status == "active")
        run.source.start.set()
    assert "error" not in run.out and "src_error" not in run.out, run.out
    assert run.out["src"].status == "completed"
    assert run.out["stats"].faults >= 1


def test_without_preempt_an_answer_is_never_overtaken_by_the_background_end(machines: Machines) -> None:
    """Single channel: a request takes its pages from the background copy; its answer must
    go out before the background's DN (the destination reads nothing on the main channel
    after it), however late the request thread gets to send."""
    run = Run(machines, "anonymous", preempt=False)
    run.source.max_bandwidth = 64 * MiB
    touch = threading.Thread(target=run.touch_last_plugged, daemon=True)
    run.on_running = touch.start  # a guest vCPU faulting while the destination goes on
    slowed: list[bool] = []
    send = run.source._send

    def late_answer(sock: socket.socket, header: bytes, data: memoryview | None, shared: bool) -> None:
        answering = threading.current_thread().name == "ramdiscard-postcopy-requests"
        if answering and not slowed:  # the request thread descheduled right after taking its pages
            slowed.append(True)
            time.sleep(1.0)
        send(sock, header, data, shared)

    run.source._send = late_answer  # type: ignore[method-assign]
    run.source.start.set()  # pure postcopy: the last plugged page is still to come
    with run.going():
        pass
    touch.join(30)
    assert slowed == [True] and not touch.is_alive()
    assert "error" not in run.out and "src_error" not in run.out, run.out
    assert run.out["src"].status == "completed" and run.out["src"].requests >= 1
    assert run.out["stats"].faults >= 1


def test_destination_death_after_switchover_keeps_the_source_copy(machines: Machines) -> None:
    run = Run(machines, "anonymous")
    run.source.io_timeout = 5
    run.source.max_bandwidth = 8 * MiB  # still in postcopy when the destination fails
    with run.going():
        _wait(lambda: run.source.stats.status == "active")
        run.swriter.pause()  # stopped from here on: its memory at the switchover is this
        before = run.src.digests()
        run.on_running = lambda: run.ls.close()  # nothing else may connect
        run.source.start.set()
        _wait(lambda: run.running.is_set())
        # The destination fails (its channels close): as if its process died.
        _wait(lambda: run.source.stats.status == "postcopy-active")
        for s in list(run.source.socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
    assert isinstance(run.out.get("src_error"), MigrationError)
    assert run.source.stats.status == "failed"
    assert run.swriter.paused  # stays stopped: the destination may have run the guest
    assert run.src.digests() == before
    assert not run.src.dev.is_busy()
    assert run.src.plugged_blocks() == BLOCKS
    assert isinstance(run.out.get("error"), MigrationError)
    assert_fresh(run.dst)
    assert not run.dwriter.running


def test_cancel_during_postcopy(machines: Machines) -> None:
    run = Run(machines, "anonymous")
    run.source.max_bandwidth = 8 * MiB  # still in postcopy at the cancel
    with run.going():
        _wait(lambda: run.source.stats.status == "active")
        run.source.start.set()
        _wait(lambda: run.source.stats.status == "postcopy-active")
        run.source.abort()
    assert isinstance(run.out.get("src_error"), MigrationError)
    assert "cancelled" in str(run.out["src_error"])
    assert run.source.stats.status == "cancelled"
    assert run.swriter.paused and run.src.plugged_blocks() == BLOCKS
    assert not run.src.dev.is_busy()
    assert_fresh(run.dst)


def test_cancel_before_switchover_leaves_the_guest_running(machines: Machines) -> None:
    run = Run(machines, "anonymous")
    with run.going():
        _wait(lambda: run.source.stats.status == "active")
        run.source.abort()
    assert run.source.stats.status == "cancelled"
    assert not run.swriter.paused
    assert "stats" not in run.out


def _switchover_bytes(m: Machine, handover: list[list[tuple[int, int]]] | None = None) -> bytes:
    """What a postcopy source switched over before its first round sends on the main
    channel: ``handover`` names the runs still to come per region (default: every
    populated run)."""
    from ramdiscard.migration.layout import collect_regions
    from ramdiscard.migration.stream import (
        Counter,
        StreamFlags,
        encode_device,
        encode_end,
        encode_handover,
        encode_region,
        encode_stream_header,
    )

    counter = Counter()
    parts = [w.MAIN_PREAMBLE, encode_stream_header(StreamFlags.LIVE)]
    regions = collect_regions(m.space, m.devices)
    for r in regions:
        parts.append(encode_region(r.info()))
        counter.meta()
    for r in regions:
        if r.device is not None:
            parts.append(encode_device(r.index, r.device.save_state()))
            counter.meta()
    runs = handover if handover is not None else [r.populated_runs() for r in regions]
    for r, named in zip(regions, runs, strict=True):
        parts.append(encode_handover(r.index, named))
        counter.meta()
    parts.append(encode_end(counter.end()))
    return b"".join(parts)


class FakeSource:
    """A scripted source: the real switchover, then whatever the test sends."""

    def __init__(self, machines: Machines) -> None:
        self.src = machines(64 * MiB)
        self.src.plug_blocks([0, 1, 2, 10])
        self.dst = machines(64 * MiB)
        self.ls = socket.create_server(("127.0.0.1", 0))
        self.out: dict[str, Any] = {}
        self.running = threading.Event()
        self.guest: list[threading.Thread] = []
        """Threads standing for vCPUs: stopping the guest waits for them."""
        self.rx = threading.Thread(target=self._receive, daemon=True)
        self.rx.start()
        port = self.ls.getsockname()[1]
        self.main = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.main.sendall(_switchover_bytes(self.src))
        self.prio = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.prio.sendall(w.PRIORITY_HELLO)

    def _receive(self) -> None:
        try:
            conn, _peer = self.ls.accept()
            with conn:
                conn.recv(len(w.MAIN_PREAMBLE), socket.MSG_WAITALL)
                self.out["stats"] = receive_postcopy(
                    conn, self.ls, self.dst.space, self.dst.devices, io_timeout=1.0,
                    on_running=self.running.set, on_failure=self._stop_guest,
                )  # fmt: skip
        except BaseException as exc:
            self.out["error"] = exc

    def _stop_guest(self) -> None:
        for t in self.guest:
            t.join(10)

    def verdict(self) -> bytes:
        self.rx.join(30)
        assert not self.rx.is_alive()
        self.main.settimeout(10)
        with contextlib.suppress(OSError):
            return self.main.recv(4096)
        return b""

    def close(self) -> None:
        for s in (self.main, self.prio, self.ls):
            s.close()


def test_a_page_outside_the_plugged_runs_fails_the_postcopy(machines: Machines) -> None:
    fake = FakeSource(machines)
    try:
        _wait(fake.running.is_set)
        fake.main.sendall(w.encode(w.PG, 1, 5 * 2 * MiB, PAGE) + b"x" * PAGE)  # block 5: unplugged
        status = fake.verdict()
    finally:
        fake.close()
    assert isinstance(fake.out.get("error"), MigrationError)
    assert "not plugged" in str(fake.out["error"])
    assert status.startswith(b"ER")
    assert_fresh(fake.dst)


def test_a_source_that_never_answers_a_request_is_cut_off(machines: Machines) -> None:
    fake = FakeSource(machines)
    touched = threading.Event()
    buf = ctypes.create_string_buffer(PAGE)

    def guest_read() -> None:  # a guest access to a plugged page that never arrives
        ctypes.memmove(buf, fake.dst.ram.host_address + 10 * 2 * MiB, PAGE)
        touched.set()

    try:
        _wait(fake.running.is_set)
        vcpu = threading.Thread(target=guest_read, daemon=True)
        fake.guest.append(vcpu)
        vcpu.start()
        head = fake.prio.recv(w.MSG.size, socket.MSG_WAITALL)
        kind, region, offset, _length = w.MSG.unpack(head)
        assert (kind, region, offset) == (w.RQ, 1, 10 * 2 * MiB)
        t0 = time.monotonic()
        status = fake.verdict()  # the handler gives up after io_timeout (1 s)
        waited = time.monotonic() - t0
    finally:
        fake.close()
    assert isinstance(fake.out.get("error"), MigrationError)
    assert "unanswered" in str(fake.out["error"]) or "sent nothing for 1 s" in str(fake.out["error"])
    assert status.startswith(b"ER")
    _wait(touched.is_set, 10)  # the waiting access was released
    assert waited < 20
    assert_fresh(fake.dst)


@pytest.mark.parametrize(
    "header",
    [
        w.encode(b"XX", 0, 0, PAGE),
        w.encode(w.PG, 7, 0, PAGE),
        w.encode(w.PG, 1, 100, PAGE),
        w.encode(w.PG, 1, 0, 2 << 20),
        w.encode(w.PG, 1, 64 * MiB - PAGE, 2 * PAGE),
        w.encode(w.RQ, 1, 0, PAGE),
    ],
    ids=["kind", "region", "misaligned", "too-long", "past-the-end", "request-on-main"],
)
def test_malformed_messages_are_refused_before_use(header: bytes) -> None:
    with pytest.raises(StreamError):
        w.check(header, w.PG + w.DN, [4 * MiB, 64 * MiB])


@pytest.mark.parametrize("postcopy", [False, True], ids=["restore", "incoming-postcopy"])
def test_incoming_postcopy_restore_neither_rediscards_nor_preallocates(
    machines: Machines, postcopy: bool
) -> None:
    src = machines(64 * MiB)
    src.plug_blocks([0, 1])
    dst = machines(64 * MiB, prealloc=True)
    dst.ram.populate(10 * dst.block, dst.block)  # memory of an unplugged block, resident
    dst.dev.restore(src.dev.save_state(), incoming_postcopy=postcopy)
    assert dst.plugged_blocks() == [0, 1]
    assert dst.ram.resident_bytes(10 * dst.block, dst.block) == (dst.block if postcopy else 0)
    assert dst.ram.resident_bytes(0, 2 * dst.block) == (0 if postcopy else 2 * dst.block)
