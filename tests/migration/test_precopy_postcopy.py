"""Precopy first, then postcopy (QEMU's flow) over real sockets with the fault-handler
process: pages sent and clean stay on the destination, pages written after they were
sent are dropped there and arrive again, a precopy that converges completes as one."""

from __future__ import annotations

import ctypes
import socket
import struct
import threading

import pytest

from ramdiscard.guest.writer import DeviceTarget, GuestWriter
from ramdiscard.hostmem import uffd
from ramdiscard.migration import postcopy_wire as w
from ramdiscard.migration.postcopy_dest import PostcopyDestStats, receive_postcopy
from ramdiscard.migration.precopy import PrecopyParams
from ramdiscard.migration.stream import (
    Counter,
    StreamFlags,
    encode_end,
    encode_handover,
    encode_region,
    encode_stream_header,
)
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh
from tests.migration.test_postcopy import BLOCKS, PAGE, Run, _differing_pages, _switchover_bytes, _wait

pytestmark = pytest.mark.skipif(
    uffd.available() is not None, reason=f"no WP_ASYNC dirty tracking: {uffd.available()}"
)

DST_SEQ = 1 << 40
"""Sequence numbers of the destination guest's writes start above this."""
NEVER = -1.0
"""A downtime limit no estimate meets: the rounds go on until the switch."""


def _run(machines: Machines, backing: str, *, downtime: float, rate: int, hot: int = 0) -> Run:
    run = Run(machines, backing)
    pattern = "hot" if hot else "random"
    run.swriter = GuestWriter(
        [DeviceTarget(run.src.dev, run.src.ram)], threading.RLock(), rate=rate, pattern=pattern,
        hot_set=hot or PAGE,
    )  # fmt: skip
    run.dwriter = GuestWriter(
        [DeviceTarget(run.dst.dev, run.dst.ram)], threading.RLock(), rate=50 * MiB, seed=9, seq_base=DST_SEQ
    )
    run.source.guest = run.swriter
    run.source.params = PrecopyParams(downtime_limit=downtime)
    return run


def test_switch_after_a_precopy_round_keeps_clean_pages(machines: Machines, backing: str) -> None:
    run = _run(machines, backing, downtime=NEVER, rate=10 * MiB)
    run.source.max_bandwidth = 64 * MiB
    with run.going():
        _wait(lambda: len(run.source.stats.round_bytes) >= 1)  # round 1 complete, round 2 under way
        assert not run.swriter.paused and run.source.stats.status == "active"
        run.source.start.set()
    assert "error" not in run.out and "src_error" not in run.out, run.out
    st = run.out["src"]
    dst: PostcopyDestStats = run.out["stats"]
    plugged = len(BLOCKS) * run.src.block
    assert st.status == "completed" and st.switched and dst.switched
    assert st.total_bytes == plugged + 4 * MiB
    assert st.round_bytes[0] == st.total_bytes  # round 1 sent everything populated
    # The destination kept what was sent and not written since; the rest was still needed.
    assert dst.kept_bytes + dst.needed_bytes == st.total_bytes
    assert dst.needed_bytes == st.needed_bytes < st.total_bytes
    assert dst.kept_bytes >= 4 * MiB  # the guest never writes the low RAM: all of it kept
    assert st.background_bytes <= st.needed_bytes <= st.background_bytes + st.request_bytes
    assert dst.priority_bytes <= st.request_bytes < plugged  # requests: missing pages only
    assert st.unplugged_requests == 0
    # Every page is the source's at the switchover (the source guest has been stopped
    # since) or a destination guest write (sequence numbers above DST_SEQ).
    assert run.dst.low is not None and run.src.low is not None
    assert run.dst.low.view == run.src.low.view
    diff = _differing_pages(run.src, run.dst)
    assert len(diff) <= run.dwriter.pages_written
    for off, ordinal, data in diff:
        seq, page = struct.unpack_from("<QQ", data)
        ok = seq > DST_SEQ and page == ordinal and data[16:] == bytes(PAGE - 16)
        assert ok, f"page {off:#x} is neither the source's nor a destination guest write"
    assert run.dst.resident_outside_plugged() == 0
    assert not run.dst.dev.is_busy() and not run.src.dev.is_busy()


def test_a_postcopy_ram_migration_never_switched_completes_as_precopy(machines: Machines) -> None:
    run = _run(machines, "anonymous", downtime=0.3, rate=10 * MiB)
    with run.going():
        pass  # migrate-start-postcopy never comes
    assert "error" not in run.out and "src_error" not in run.out, run.out
    st = run.out["src"]
    dst: PostcopyDestStats = run.out["stats"]
    assert st.status == "completed" and not st.switched and not dst.switched
    assert run.swriter.paused and not run.dwriter.running  # no postcopy: the guest did not start
    assert dst.faults == dst.requests == dst.needed_bytes == 0 and st.requests == 0
    assert st.page_bytes >= st.total_bytes == len(BLOCKS) * run.src.block + 4 * MiB
    assert run.src.digests() == run.dst.digests()
    assert run.dst.plugged_blocks() == BLOCKS
    assert run.dst.resident_outside_plugged() == 0
    assert not run.dst.dev.is_busy() and not run.src.dev.is_busy()


def test_a_page_written_after_it_was_sent_is_dropped_and_arrives_again(
    machines: Machines, backing: str
) -> None:
    hot = 16 * PAGE  # the source guest keeps writing only these
    run = _run(machines, backing, downtime=NEVER, rate=1 * MiB, hot=hot)
    run.dwriter = GuestWriter([DeviceTarget(run.dst.dev, run.dst.ram)], threading.RLock(), rate=0)
    page = 21 * run.src.block + 5 * PAGE  # plugged, far from the hot pages
    old = bytes(run.src.ram.view[page : page + PAGE])
    new = ctypes.create_string_buffer(b"written after it was sent".ljust(PAGE, b"!"), PAGE)
    with run.going():
        _wait(lambda: len(run.source.stats.round_bytes) >= 1)
        _wait(lambda: bytes(run.dst.ram.view[page : page + PAGE]) == old)  # the destination holds it
        ctypes.memmove(run.src.ram.host_address + page, new, PAGE)  # a guest write, after the send
        run.source.start.set()
    assert "error" not in run.out and "src_error" not in run.out, run.out
    st = run.out["src"]
    dst: PostcopyDestStats = run.out["stats"]
    assert st.status == "completed" and st.switched
    assert bytes(run.dst.ram.view[page : page + PAGE]) == new.raw
    assert dst.dropped_bytes >= PAGE  # it was there and was dropped
    # Only the hot pages and the page written were still needed; everything else was kept.
    assert PAGE <= st.needed_bytes <= hot + PAGE
    assert dst.kept_bytes == st.total_bytes - st.needed_bytes
    assert st.background_bytes <= st.needed_bytes
    assert run.src.digests() == run.dst.digests()  # no guest write on the destination here


def _scripted(machines: Machines, handover: list[list[tuple[int, int]]]) -> tuple[bytes, object]:
    """A source that switches over at once, naming ``handover`` per region; returns the
    destination's status bytes and its error."""
    src, dst = machines(64 * MiB), machines(64 * MiB)
    src.plug_blocks([0, 1, 2, 10])
    out: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as ls:

        def receive() -> None:
            try:
                conn, _peer = ls.accept()
                with conn:
                    conn.recv(len(w.MAIN_PREAMBLE), socket.MSG_WAITALL)
                    receive_postcopy(conn, ls, dst.space, dst.devices, io_timeout=5.0)
            except BaseException as exc:
                out["error"] = exc

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        with socket.create_connection(ls.getsockname()[:2], timeout=10) as main:
            main.sendall(_switchover_bytes(src, handover))
            main.shutdown(socket.SHUT_WR)
            status = main.recv(4096)
        rx.join(30)
        assert not rx.is_alive()
    assert_fresh(dst)
    return status, out.get("error")


@pytest.mark.parametrize(
    ("handover", "why"),
    [
        ([[(0, 4 * MiB)], [(0, 6 * MiB)]], "neither received nor named"),  # block 10 never arrives
        ([[(0, 4 * MiB)], [(0, 6 * MiB), (10 * 2 * MiB, 4 * MiB)]], "outside its plugged memory"),
    ],
    ids=["plugged-page-missing", "unplugged-page-named"],
)
def test_a_switchover_that_does_not_add_up_is_refused(
    machines: Machines, handover: list[list[tuple[int, int]]], why: str
) -> None:
    status, error = _scripted(machines, handover)
    assert status.startswith(b"ER") and why.encode() in status
    assert why in str(error)


def _decode(parts: list[bytes], postcopy_ok: bool = True) -> None:
    from ramdiscard.migration.decoder import Decoder

    dec = Decoder(live_ok=True, postcopy_ok=postcopy_ok)
    data = memoryview(b"".join(parts))
    while not dec.done:
        n = dec.need()
        dec.feed(data[:n])
        data = data[n:]


def _region(index: int, size: int) -> bytes:
    from ramdiscard.migration.stream import RegionInfo, RegionKind

    return encode_region(RegionInfo(index, RegionKind.WHOLE, size, index * size, PAGE, f"r{index}", ""))


@pytest.mark.parametrize(
    ("sections", "postcopy_ok", "why"),
    [
        ([[(0, PAGE)], []], False, "outside a postcopy"),
        ([[(0, PAGE + 1)], []], True, "misaligned"),
        ([[(0, 2 * PAGE), (PAGE, PAGE)], []], True, "out of order"),
        ([[(0, 0)], []], True, "empty"),
        ([[(MiB - PAGE, 2 * PAGE)], []], True, "outside the region"),
        ([[(0, PAGE)]], True, "for 1 of 2 regions"),
    ],
    ids=["not-postcopy", "misaligned", "overlapping", "empty", "past-the-end", "region-missing"],
)
def test_malformed_postcopy_sections_are_refused(
    sections: list[list[tuple[int, int]]], postcopy_ok: bool, why: str
) -> None:
    from ramdiscard.migration.stream import StreamError

    counter = Counter()
    parts = [encode_stream_header(StreamFlags.LIVE), _region(0, MiB), _region(1, MiB)]
    counter.meta()
    counter.meta()
    for index, runs in enumerate(sections):
        parts.append(encode_handover(index, runs))
        counter.meta()
    parts.append(encode_end(counter.end()))
    with pytest.raises(StreamError, match=why):
        _decode(parts, postcopy_ok)


def test_a_well_formed_switchover_decodes() -> None:
    counter = Counter()
    parts = [encode_stream_header(StreamFlags.LIVE), _region(0, MiB), _region(1, MiB)]
    runs = [[(0, PAGE), (PAGE, PAGE), (MiB - PAGE, PAGE)], []]
    for _i in range(2):
        counter.meta()
    for index, r in enumerate(runs):
        parts.append(encode_handover(index, r))
        counter.meta()
    parts.append(encode_end(counter.end()))
    _decode(parts)
