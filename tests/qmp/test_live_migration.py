"""Live migration between two ``ramdiscard serve`` processes, driven with QEMU's QMP
commands while the source guest keeps writing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, QMPClient

from ramdiscard.hostmem import uffd
from ramdiscard.units import MiB

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BOOT = 16 * MiB
PLUGGED = 64 * MiB
SCENARIO = """
name = "live"
boot-ram = "16M"
[[devices]]
id = "vm0"
size = "256M"
requested-size = "64M"
backing = "memfd"
[[consumers]]
type = "vfio"
backend = "auto"
[workload]
touch = 1.0
write-rate = "20M"
write-pattern = "random"
"""

pytestmark = pytest.mark.skipif(uffd.available() is not None, reason=f"no WP_ASYNC: {uffd.available()}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="rdlive-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _serve(
    workdir: Path, name: str, *extra: str, scenario: str = SCENARIO
) -> tuple[subprocess.Popen[str], str]:
    (workdir / "s.toml").write_text(scenario)
    sock = str(workdir / f"{name}.qmp")
    code = "import sys; from ramdiscard.cli.serve import cli_main; sys.exit(cli_main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src")}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(workdir / "s.toml"), "--qmp", f"unix:{sock}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not os.path.exists(sock):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    return proc, sock


@contextlib.contextmanager
def _servers(workdir: Path, *specs: tuple[str, tuple[str, ...]]) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        socks = []
        for name, extra in specs:
            p, s = _serve(workdir, name, *extra)
            procs.append(p)
            socks.append(s)
        yield socks
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
            if p.poll() is None:
                p.kill()


async def _client(sock: str) -> QMPClient:
    qmp = QMPClient("live-test")
    await qmp.connect(sock)
    return qmp


async def _until(qmp: QMPClient, cmd: str, pred: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await qmp.execute(cmd)
        if pred(value):
            return value
        assert time.monotonic() < deadline, f"{cmd}: {value}"
        await asyncio.sleep(0.05)


def _plugged(devs: Any) -> int:
    return int(devs[0]["data"]["size"])


def test_precopy_between_processes_with_writer(workdir: Path) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        assert (await dst.execute("query-status"))["status"] == "inmigrate"
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
        await asyncio.sleep(0.3)  # the writer has run for a while
        rss_before = (await src.execute("x-ramdiscard-status"))["rss"]
        await src.execute("migrate-set-parameters", {"downtime-limit": 20})
        passes = []
        with src.listen(events := EventListener(("MIGRATION", "MIGRATION_PASS"))):
            assert await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
            statuses = []
            while not statuses or statuses[-1] not in ("completed", "failed"):
                ev = await asyncio.wait_for(events.get(), 60)
                if ev["event"] == "MIGRATION":
                    statuses.append(ev["data"]["status"])
                elif ev["event"] == "MIGRATION_PASS":
                    passes.append(ev["data"]["pass"])
        info = await src.execute("query-migrate")
        assert statuses == ["setup", "active", "completed"], info
        assert passes and passes == sorted(passes)
        assert info["ram"]["dirty-sync-count"] >= 1
        assert info["ram"]["total"] == BOOT + PLUGGED
        assert "downtime" in info and info["total-time"] >= info["downtime"]
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        await _until(dst, "query-status", lambda s: s["status"] == "paused")
        src_digest = await src.execute("x-ramdiscard-memory-digest")
        dst_digest = await dst.execute("x-ramdiscard-memory-digest")
        assert src_digest == dst_digest
        dst_status = await dst.execute("x-ramdiscard-status")
        assert dst_status["plugged"] == PLUGGED
        assert dst_status["pinned"] == BOOT + PLUGGED
        assert _plugged(await dst.execute("query-memory-devices")) == PLUGGED
        rss_after = (await src.execute("x-ramdiscard-status"))["rss"]
        # 192 MiB of the device are discarded memfd memory: reading any would count here.
        assert rss_after - rss_before < 16 * MiB, (rss_before, rss_after)
        for q in (src, dst):
            await q.execute("quit")
            with contextlib.suppress(Exception):
                await q.disconnect()

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer", "-S"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 120))


@contextlib.contextmanager
def _deaf_destination() -> Iterator[int]:
    """A TCP peer that accepts connections and never reads from them."""
    ls = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        ls.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(ls.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1]
    finally:
        stop.set()
        t.join(10)
        for c in held:
            c.close()
        ls.close()


async def _source_intact(src: QMPClient) -> None:
    """The source guest runs with its plugged memory and pins, and the device is no
    longer frozen (a resize goes through)."""
    assert (await src.execute("query-status"))["status"] == "running"
    with pytest.raises(Exception, match="guest is running"):
        await src.execute("x-ramdiscard-memory-digest")  # the writer still runs
    status = await src.execute("x-ramdiscard-status")
    assert status["plugged"] == PLUGGED
    assert status["pinned"] == BOOT + PLUGGED
    await src.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": PLUGGED + 32 * MiB})
    await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED + 32 * MiB, 30)
    status = await src.execute("x-ramdiscard-status")
    assert status["pinned"] == BOOT + PLUGGED + 32 * MiB


async def _wait_status(qmp: QMPClient, wanted: tuple[str, ...], bound: float) -> dict[str, Any]:
    info: dict[str, Any] = await _until(qmp, "query-migrate", lambda m: m.get("status") in wanted, bound)
    return info


def test_cancel_against_a_destination_that_never_reads(workdir: Path) -> None:
    # The source would only give up on its own after 60 s; throttled, the kernel's
    # buffers take the stream for a long while before any send blocks.
    async def drive(src_sock: str, port: int) -> None:
        src = await _client(src_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        await src.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        with src.listen(events := EventListener(("MIGRATION",))):
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            await _wait_status(src, ("active",), 30)
            await asyncio.sleep(0.5)  # in flight: throttled sends into the deaf peer
            await src.execute("migrate_cancel")
            info = await _wait_status(src, ("cancelled", "failed", "completed"), 15)
            statuses = []
            while not statuses or statuses[-1] != info["status"]:
                statuses.append((await asyncio.wait_for(events.get(), 10))["data"]["status"])
        assert info["status"] == "cancelled", info
        assert info["error-desc"] == "migration cancelled"
        assert statuses == ["setup", "active", "cancelled"]
        await _source_intact(src)
        await src.execute("quit")
        with contextlib.suppress(Exception):
            await src.disconnect()

    with _deaf_destination() as port, _servers(workdir, ("src", ("--migrate-timeout", "60"))) as (s,):
        asyncio.run(asyncio.wait_for(drive(s, port), 120))


def test_stall_cut_off_after_the_configured_silence(workdir: Path) -> None:
    # 256 KiB/s: the socket buffers alone (several MiB) would hide the stall for
    # tens of seconds; the destination's missing acknowledgements give it away.
    async def drive(src_sock: str, port: int) -> None:
        src = await _client(src_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        await src.execute("migrate-set-parameters", {"max-bandwidth": 256 << 10})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await _wait_status(src, ("cancelled", "failed", "completed"), 15)
        assert info["status"] == "failed", info
        assert info["error-desc"] == "the destination read nothing for 2 s; migration abandoned"
        # It did send: the stall was seen while data was outstanding, not before.
        assert info["ram"]["transferred"] > 0
        await _source_intact(src)
        await src.execute("quit")
        with contextlib.suppress(Exception):
            await src.disconnect()

    with _deaf_destination() as port, _servers(workdir, ("src", ("--migrate-timeout", "2"))) as (s,):
        asyncio.run(asyncio.wait_for(drive(s, port), 120))


async def _resize(qmp: QMPClient, size: int) -> None:
    await qmp.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": size})


@pytest.mark.parametrize("resizable", [True, False], ids=["resize-during-precopy", "qemu-busy"])
def test_resize_during_precopy(workdir: Path, resizable: bool) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
        caps = [{"capability": "x-ramdiscard-resize-during-migration", "state": resizable}]
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        # Throttled so that the precopy is still in its rounds while the guest resizes.
        await src.execute("migrate-set-parameters", {"downtime-limit": 20, "max-bandwidth": 8 << 20})
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await _wait_status(src, ("active",), 30)
        expected = PLUGGED
        if resizable:
            await _resize(src, PLUGGED + 64 * MiB)  # plugged blocks join the dirty set
            await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED + 64 * MiB, 30)
            assert (await src.execute("query-migrate"))["status"] == "active"
            await _resize(src, 32 * MiB)  # unplugged ones leave it, the destination discards them
            await _until(src, "query-memory-devices", lambda d: _plugged(d) == 32 * MiB, 30)
            assert (await src.execute("query-migrate"))["status"] == "active"
            expected = 32 * MiB
        else:
            await _resize(src, 32 * MiB)  # refused (BUSY) until the migration ends
        await src.execute("migrate-set-parameters", {"max-bandwidth": 0})
        info = await _wait_status(src, ("completed", "failed", "cancelled"), 60)
        assert info["status"] == "completed", info
        assert _plugged(await src.execute("query-memory-devices")) == expected
        await _until(dst, "query-status", lambda s: s["status"] == "paused")
        if not resizable:
            # The source refused to move (BUSY) throughout; the request travelled with
            # the device state and the destination's guest follows it afterwards.
            await _until(dst, "query-memory-devices", lambda d: _plugged(d) == 32 * MiB, 30)
            for q in (src, dst):
                await q.execute("quit")
                with contextlib.suppress(Exception):
                    await q.disconnect()
            return
        src_digest = await src.execute("x-ramdiscard-memory-digest")
        dst_digest = await dst.execute("x-ramdiscard-memory-digest")
        assert src_digest == dst_digest
        dst_status = await dst.execute("x-ramdiscard-status")
        assert dst_status["plugged"] == expected
        assert dst_status["pinned"] == BOOT + expected
        assert sum(n for _s, n in dst_digest["regions"][-1]["runs"]) == expected
        for q in (src, dst):
            await q.execute("quit")
            with contextlib.suppress(Exception):
                await q.disconnect()

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer", "-S"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


def test_background_snapshot_to_file_while_the_guest_writes(workdir: Path) -> None:
    """(Without the vfio consumer: with DMA pins the snapshot is refused.)"""
    from qemu.qmp import ExecuteError

    path = workdir / "snap.ram"

    async def drive(src_sock: str) -> None:
        src = await _client(src_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        caps = [{"capability": "background-snapshot", "state": True}]
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        with pytest.raises(ExecuteError, match="needs a file: URI"):
            await src.execute("migrate", {"uri": "tcp:127.0.0.1:1"})
        assert (await src.execute("query-migrate")) == {}
        with src.listen(events := EventListener(("MIGRATION",))):
            assert await src.execute("migrate", {"uri": f"file:{path}"}) == {}
            statuses: list[str] = []
            while not statuses or statuses[-1] not in ("completed", "failed"):
                ev = await asyncio.wait_for(events.get(), 60)
                statuses.append(ev["data"]["status"])
        info = await src.execute("query-migrate")
        assert statuses == ["setup", "active", "completed"], info
        assert info["ram"]["total"] == BOOT + PLUGGED
        assert (await src.execute("query-status"))["status"] == "running"
        with pytest.raises(ExecuteError, match="the guest is running"):
            await src.execute("x-ramdiscard-memory-digest")  # the writer was never left paused
        st = os.stat(path)
        assert BOOT + PLUGGED < st.st_blocks * 512 <= BOOT + PLUGGED + 1 * MiB
        await src.execute("quit")
        with contextlib.suppress(Exception):
            await src.disconnect()

    no_pins = SCENARIO.replace('type = "vfio"\nbackend = "auto"', 'type = "kvm"')
    proc, sock = _serve(workdir, "src", scenario=no_pins)
    try:
        asyncio.run(asyncio.wait_for(drive(sock), 120))
    finally:
        _end(proc)


def _end(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def _uffd_fds(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            n += "userfaultfd" in os.readlink(f"/proc/{pid}/fd/{fd}")
    return n


PINNING = """
name = "pinned"
boot-ram = "0"
[[devices]]
id = "vm0"
size = "256M"
backing = "memfd"
[[consumers]]
type = "vfio"
backend = "auto"
[workload]
write-rate = "20M"
"""


def test_background_snapshot_refused_while_dma_pins_exist(workdir: Path) -> None:
    """Write protection cannot see a device's DMA writes: with pins, setting the
    capability is refused, and so is a migrate when the pins appeared after it was set;
    nothing is protected or written and the guest runs on with its pins."""
    from qemu.qmp import ExecuteError

    path = workdir / "snap.ram"
    caps = [{"capability": "background-snapshot", "state": True}]
    proc, sock = _serve(workdir, "src", scenario=PINNING)

    async def resize(q: QMPClient, size: int) -> None:
        await q.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": size})
        await _until(q, "query-memory-devices", lambda d: _plugged(d) == size)

    async def drive() -> None:
        src = await _client(sock)
        await resize(src, PLUGGED)
        before = await src.execute("x-ramdiscard-status")
        if before["pinned"] == 0:
            pytest.skip("the vfio consumer's backend pins nothing on this host")
        assert before["pinned"] == PLUGGED
        with pytest.raises(ExecuteError, match="not compatible with guest memory configuration: vfio0 holds"):
            await src.execute("migrate-set-capabilities", {"capabilities": caps})
        states = await src.execute("query-migrate-capabilities")
        assert {"capability": "background-snapshot", "state": False} in states
        await resize(src, 0)
        await _until(src, "x-ramdiscard-status", lambda s: s["pinned"] == 0)
        await src.execute("migrate-set-capabilities", {"capabilities": caps})
        await resize(src, PLUGGED)
        await _until(src, "x-ramdiscard-status", lambda s: s["pinned"] == PLUGGED)
        with pytest.raises(ExecuteError, match="cannot see device DMA writes, migration not started"):
            await src.execute("migrate", {"uri": f"file:{path}"})
        assert (await src.execute("query-migrate")) == {}
        assert not path.exists()
        assert _uffd_fds(proc.pid) == 0
        assert (await src.execute("query-status"))["status"] == "running"
        with pytest.raises(ExecuteError, match="the guest is running"):
            await src.execute("x-ramdiscard-memory-digest")  # the writer runs on
        after = await src.execute("x-ramdiscard-status")
        assert (after["plugged"], after["pinned"]) == (PLUGGED, PLUGGED)
        assert after["vm-pin"] == before["vm-pin"] > 0
        await resize(src, PLUGGED + 32 * MiB)  # the device is not frozen
        await src.execute("quit")
        with contextlib.suppress(Exception):
            await src.disconnect()

    try:
        asyncio.run(asyncio.wait_for(drive(), 120))
    finally:
        _end(proc)
