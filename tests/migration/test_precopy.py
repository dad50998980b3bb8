"""Precopy with a guest writing all the time: equal content, discarded memory untouched."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

import pytest

from ramdiscard.guest.writer import DeviceTarget, GuestWriter
from ramdiscard.hostmem import uffd
from ramdiscard.migration import MigrationError
from ramdiscard.migration.live_load import receive_live
from ramdiscard.migration.precopy import PrecopyParams, PrecopySource, precopy_to
from ramdiscard.migration.runs import Coverage
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh
from tests.migration.machine import Machine

BLOCKS = [0, 1, 2, 5, 6, 9, 20, 21, 22, 23, 40, 63]


def _pair(machines: Machines, backing: str) -> tuple[Machine, Machine, GuestWriter, threading.RLock]:
    src = machines(128 * MiB, backing=backing)
    dst = machines(128 * MiB, backing=backing)
    src.plug_blocks(BLOCKS)
    src.fill(3)
    lock = threading.RLock()
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], lock, rate=50 * MiB, seed=5)
    return src, dst, writer, lock


def _migrate(src: Machine, dst: Machine, writer: GuestWriter, **kw: Any) -> tuple[Any, dict[str, Any]]:
    out: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                out["stats"] = receive_live(ls, dst.space, dst.devices, accept_timeout=30, read_timeout=30)
            except BaseException as exc:
                out["error"] = exc

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        try:
            stats = precopy_to(
                "127.0.0.1", port, src.space, src.devices, writer, timeout=30, io_timeout=30, **kw
            )
        finally:
            t.join(60)
    return stats, out


@pytest.mark.skipif(uffd.available() is not None, reason=f"no WP_ASYNC dirty tracking: {uffd.available()}")
def test_precopy_with_writer_converges(machines: Machines, backing: str) -> None:
    src, dst, writer, _lock = _pair(machines, backing)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while writer.pages_written < 500:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        resident_before = src.resident_outside_plugged()
        stats, out = _migrate(src, dst, writer, params=PrecopyParams(downtime_limit=0.02))
        assert "error" not in out, out.get("error")
        assert writer.paused
        frozen = writer.pages_written
        assert stats.status == "completed"
        assert stats.fallback is None
        assert stats.rounds == len(stats.round_bytes) - 1
        assert sum(stats.round_bytes) == stats.page_bytes
        assert stats.round_bytes[0] == len(BLOCKS) * src.block + 4 * MiB
        assert src.digests() == dst.digests()
        assert dst.dev.plugged_size == src.dev.plugged_size
        assert dst.resident_outside_plugged() == 0
        assert src.resident_outside_plugged() == resident_before == 0
        assert writer.pages_written == frozen
        assert not src.dev.is_busy() and not dst.dev.is_busy()
    finally:
        writer.resume()
        writer.stop()


def test_refused_stream_leaves_source_running(machines: Machines) -> None:
    src, dst, writer, _lock = _pair(machines, "anonymous")
    dst.plug_blocks([3])  # a destination that is not empty refuses
    writer.start()
    try:
        digests = src.digests()
        with pytest.raises(MigrationError, match="must start empty"):
            _migrate(src, dst, writer)
        assert not writer.paused
        before = writer.pages_written
        deadline = time.monotonic() + 10
        while writer.pages_written == before:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert src.plugged_blocks() == BLOCKS
        assert set(src.digests()) == set(digests)
        assert not src.dev.is_busy()
    finally:
        writer.stop()


def test_cancel_during_rounds_leaves_source_intact(machines: Machines) -> None:
    src, dst, writer, _lock = _pair(machines, "memfd")
    writer.start()
    sources: list[PrecopySource] = []

    def progress(stats: Any) -> None:
        if stats.rounds >= 1:
            sources[0].cancel.set()

    try:
        with pytest.raises(MigrationError):
            _migrate(
                src, dst, writer, params=PrecopyParams(downtime_limit=0.0, max_rounds=1000),
                progress=progress, on_start=sources.append,
            )  # fmt: skip
        assert not writer.paused
        assert src.plugged_blocks() == BLOCKS
        assert not src.dev.is_busy()
        assert src.resident_outside_plugged() == 0
        assert_fresh(dst)
    finally:
        writer.stop()


def test_silent_destination_cut_off(machines: Machines) -> None:
    src, _dst, writer, _lock = _pair(machines, "anonymous")
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(MigrationError, match=r"read nothing|lost|refused|status"):
            precopy_to("127.0.0.1", port, src.space, src.devices, writer, timeout=1.0, io_timeout=1.0)
        assert time.monotonic() - t0 < 30
    assert not src.dev.is_busy()
    assert not writer.paused


def test_coverage_sets() -> None:
    c = Coverage()
    c.add(0, 10)
    c.add(20, 30)
    c.add(5, 22)
    assert (c.starts, c.ends) == ([0], [30])
    c.remove(10, 12)
    assert (c.starts, c.ends) == ([0, 12], [10, 30])
    assert c.covers(0, 10) and not c.covers(0, 11) and c.covers(12, 30)


def test_page_list_outside_plugged_memory_is_refused(machines: Machines) -> None:
    from ramdiscard.migration.checksum import Checksum
    from ramdiscard.migration.layout import collect_regions
    from ramdiscard.migration.stream import (
        StreamFlags,
        encode_device,
        encode_region,
        encode_stream_header,
        page_list_header,
    )

    src = machines(128 * MiB)
    dst = machines(128 * MiB)
    src.plug_blocks([0, 1])
    regions = collect_regions(src.space, src.devices)
    managed = next(r for r in regions if r.device is not None)
    head = [encode_stream_header(StreamFlags.LIVE, Checksum.CRC32)]
    head += [encode_region(r.info()) for r in regions]
    head.append(encode_device(managed.index, src.dev.save_state()))
    inside, outside = src.block, 40 * src.block  # block 40 is not plugged
    data = b"\x5a" * 8192
    pages = page_list_header(managed.index, [inside, outside], data, Checksum.CRC32) + data
    out: dict[str, Any] = {}
    with socket.create_server(("127.0.0.1", 0)) as ls:

        def receive() -> None:
            try:
                receive_live(ls, dst.space, dst.devices, accept_timeout=30, read_timeout=30)
            except BaseException as exc:
                out["error"] = exc

        t = threading.Thread(target=receive, daemon=True)
        t.start()
        with socket.create_connection(ls.getsockname()[:2], timeout=30) as c:
            c.sendall(b"".join(head) + pages)
            c.shutdown(socket.SHUT_WR)
            c.settimeout(30)
            with contextlib.suppress(OSError):
                while c.recv(4096):
                    pass
        t.join(30)
    assert isinstance(out.get("error"), MigrationError), out
    assert "not inside a plugged range" in str(out["error"])
    assert_fresh(dst)
    assert dst.ram.resident_bytes(0, dst.ram.size) == 0
