"""Background snapshot: memory as of the start, written while the guest keeps writing."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from pathlib import Path

import pytest

from ramdiscard import migration
from ramdiscard.guest.writer import DeviceTarget, GuestWriter
from ramdiscard.migration import MigrationError
from ramdiscard.migration.snapshot import background_snapshot
from ramdiscard.units import MiB
from tests.migration.conftest import Machines
from tests.migration.machine import Machine

BLOCKS = [0, 1, 2, 5, 6, 9, 20, 21, 22, 23, 40, 63]


def _source(machines: Machines, backing: str) -> tuple[Machine, GuestWriter]:
    src = machines(128 * MiB, backing=backing)
    src.plug_blocks(BLOCKS)
    src.fill(11)
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], threading.RLock(), rate=50 * MiB, seed=3)
    writer.start()
    deadline = time.monotonic() + 10
    while writer.pages_written < 300:
        assert time.monotonic() < deadline, "the writer did not start writing"
        time.sleep(0.01)
    return src, writer


def _wait_more_writes(writer: GuestWriter, than: int) -> None:
    deadline = time.monotonic() + 10
    while writer.pages_written <= than:
        assert time.monotonic() < deadline, "the writer is stuck"
        time.sleep(0.01)


def test_background_snapshot_holds_memory_of_the_start(
    machines: Machines, backing: str, tmp_path: Path
) -> None:
    src, writer = _source(machines, backing)
    assert src.low is not None  # plain RAM, also protected, never written by the writer
    last_page = src.low.host_address + src.low.size - 4096
    start: dict[str, object] = {}
    poked = threading.Event()

    def poke() -> None:  # a write into protected memory from a thread of this process
        ctypes.memset(last_page, 0xEE, 4096)
        poked.set()

    def on_start() -> None:
        start["digests"] = src.digests()
        start["written"] = writer.pages_written
        threading.Thread(target=poke, daemon=True).start()

    path = tmp_path / "snap.ram"
    try:
        outside = src.resident_outside_plugged()
        with open(path, "wb") as f:
            stats = background_snapshot(src.space, src.devices, f, writer, on_start=on_start, timeout=60)
        assert not writer.paused
        _wait_more_writes(writer, int(start["written"]))  # type: ignore[call-overload]
        assert poked.wait(10)
        assert src.low.view[src.low.size - 1] == 0xEE
        assert src.resident_outside_plugged() == outside == 0
        assert not src.dev.is_busy()
    finally:
        writer.stop()
    plugged = len(BLOCKS) * src.block
    low = 4 * MiB
    assert stats.page_bytes == plugged + low
    st = os.stat(path)
    meta_alloc = st.st_blocks * 512 - plugged - low
    assert 0 < meta_alloc <= 64 * 1024, f"allocated {st.st_blocks * 512} for {plugged + low} of data"
    assert st.st_size == stats.file_size
    dst = machines(128 * MiB, backing=backing)
    with open(path, "rb") as snap:
        migration.load(dst.space, dst.devices, snap)
    assert dst.plugged_blocks() == BLOCKS
    assert dst.digests() == start["digests"]
    assert dst.digests() != src.digests()  # the guest did write on


def test_background_snapshot_cancel_leaves_guest_running(machines: Machines, tmp_path: Path) -> None:
    src, writer = _source(machines, "anonymous")
    cancel = threading.Event()
    path = tmp_path / "snap.ram"
    try:
        with open(path, "wb") as f, pytest.raises(MigrationError, match="cancelled"):
            background_snapshot(src.space, src.devices, f, writer, on_start=cancel.set, cancel=cancel)
        assert not writer.paused
        now = writer.pages_written
        _wait_more_writes(writer, now + 200)
        assert os.stat(path).st_size == 0
        assert not src.dev.is_busy()
        assert src.dev.plug(src.dev.addr + 30 * src.block, 1).name == "ACK"
    finally:
        writer.stop()
