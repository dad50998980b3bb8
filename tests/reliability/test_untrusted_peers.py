"""Hostile sockets, streams and peers (issue 15, items 3-6 and 10), through the real CLI,
real loopback sockets (ephemeral ports) and real files. Every wait polls a condition with
a bound; memory bounds come from the machines' own sizes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.qmp_client import ExecuteError

from ramdiscard.machine import Machine, load_scenario
from ramdiscard.migration.checksum import Checksum
from ramdiscard.migration.layout import collect_regions
from ramdiscard.migration.stream import (
    MAX_NAME,
    RegionInfo,
    RegionKind,
    SectionType,
    _section_header,
    encode_device,
    encode_region,
    encode_stream_header,
    page_header,
    section,
)
from ramdiscard.units import MiB

CLI = [sys.executable, "-c", "import sys; from ramdiscard.cli.main import main; sys.exit(main())"]
SRC = Path(__file__).resolve().parents[2] / "src"

SCENARIO = """
name = "peers"
boot-ram = "16M"

[[devices]]
id = "vm0"
size = "128M"
block-size = "2M"
backing = "anonymous"

[[consumers]]
type = "vfio"
backend = "auto"
coordinate-discards = true
"""
DEVICE_SIZE = 128 * MiB
BOOT_RAM = 16 * MiB


def _wait(cond: Callable[[], object], bound: float, what: str) -> None:
    deadline = time.monotonic() + bound
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _proc_kib(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    assert m is not None, key
    return int(m.group(1))


@contextmanager
def _cli(*args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def _listening_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
    assert m is not None, line
    return int(m.group(1))


def _scenario(tmp_path: Path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(SCENARIO)
    return path


def _forged_prefix(scenario: Path) -> bytes:
    """Header, region table, a device state marking every block plugged, one page header."""
    src = Machine.from_scenario(load_scenario(scenario))
    try:
        dev = next(iter(src.devices.values()))
        dev.requested_size = dev.region_size
        assert dev.plug(dev.addr, dev.region_size // dev.block_size).name == "ACK"
        regions = collect_regions(src.space_or_fail(), list(src.devices.values()))
        data = encode_stream_header(checksum=Checksum.CRC32)
        data += b"".join(encode_region(r.info()) for r in regions)
        data += b"".join(encode_device(r.index, r.device.save_state()) for r in regions if r.device)
        return data + page_header(0, 0, bytes(4096))
    finally:
        src.close()


# -- item 3 ------------------------------------------------------------------------------------


def test_receiver_times_out_and_pins_nothing_ahead_of_the_data(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    prefix = _forged_prefix(scenario)
    with _cli(
        "migrate", "receive", "--scenario", str(scenario), "--port", "0", "--timeout", "2", "--quiet"
    ) as rx:
        port = _listening_port(rx)
        pinned_before = _proc_kib(rx.pid, "VmPin")
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(prefix)
            # The receiver has everything but page data; it must not have pinned the
            # announced 128 MiB (only what arrived: nothing, the page header aside).
            time.sleep(0.5)
            if rx.poll() is None:
                assert _proc_kib(rx.pid, "VmPin") * 1024 <= pinned_before * 1024 + len(prefix)
            _wait(lambda: rx.poll() is not None, 30, "the receiver to give up on a silent sender")
            assert rx.stderr is not None
            err = rx.stderr.read().strip().splitlines()
    assert rx.returncode == 1
    assert len(err) == 1 and "read timeout" in err[0] and len(err[0]) < 300


def test_receiver_timeout_leaves_the_destination_fresh(tmp_path: Path) -> None:
    from ramdiscard.migration.tcp import receive_from

    scenario = _scenario(tmp_path)
    prefix = _forged_prefix(scenario)
    dst = Machine.from_scenario(load_scenario(scenario))
    try:
        fresh = dst.status()["pinned"]
        errors: list[BaseException] = []
        with socket.create_server(("127.0.0.1", 0)) as ls:

            def receive() -> None:
                try:
                    receive_from(
                        ls, dst.space_or_fail(), list(dst.devices.values()), accept_timeout=10, read_timeout=1
                    )
                except BaseException as exc:
                    errors.append(exc)

            t = threading.Thread(target=receive, daemon=True)
            t.start()
            with socket.create_connection(ls.getsockname()) as s:
                s.sendall(prefix)
                t.join(30)
        assert not t.is_alive() and errors and "read timeout" in str(errors[0])
        assert sum(d.plugged_size for d in dst.devices.values()) == 0
        assert dst.status()["pinned"] == fresh
    finally:
        dst.close()


# -- item 4 ------------------------------------------------------------------------------------


@contextmanager
def _stuck_peer() -> Iterator[tuple[int, list[socket.socket]]]:
    """A loopback peer that accepts and never reads."""
    ls = socket.create_server(("127.0.0.1", 0))
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        ls.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(ls.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[1], conns
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        ls.close()


def test_stuck_migration_does_not_wedge_qmp(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    sock = str(tmp_path / "qmp.sock")
    with (
        _cli("serve", str(scenario), "--qmp", f"unix:{sock}", "--migrate-timeout", "3") as srv,
        _stuck_peer() as (
            port,
            conns,
        ),
    ):
        _wait(lambda: os.path.exists(sock), 30, "the QMP socket")

        async def drive() -> None:
            a, b = QMPClient("a"), QMPClient("b")
            await a.connect(sock)
            await b.connect(sock)
            await a.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": DEVICE_SIZE})
            for _ in range(1500):
                devs: Any = await a.execute("query-memory-devices")
                dev = devs[0]
                if dev["data"]["size"] == DEVICE_SIZE:
                    break
                await asyncio.sleep(0.02)
            status: Any = await a.execute("x-ramdiscard-status")
            assert status["pinned"] >= DEVICE_SIZE
            uri = {"uri": f"tcp:127.0.0.1:{port}"}
            # 1. cancelled: other clients get answers meanwhile
            mig = asyncio.ensure_future(a.execute("x-ramdiscard-migrate", uri))
            while len(conns) < 1:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)
            assert not mig.done()
            answer: Any = await asyncio.wait_for(b.execute("query-status"), 2)
            assert answer["status"] == "running"
            assert await asyncio.wait_for(b.execute("migrate_cancel"), 2) == {}
            with pytest.raises(ExecuteError, match="cancel"):
                await asyncio.wait_for(mig, 10)
            # 2. bounded silence: fails by itself
            with pytest.raises(ExecuteError, match="read nothing for 3 s"):
                await asyncio.wait_for(a.execute("x-ramdiscard-migrate", uri), 30)
            # 3. SIGTERM while stuck
            stuck = asyncio.ensure_future(a.execute("x-ramdiscard-migrate", uri))
            while len(conns) < 3:
                await asyncio.sleep(0.02)
            srv.send_signal(signal.SIGTERM)
            for c in (a, b):
                with contextlib.suppress(Exception):
                    await c.disconnect()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(stuck, 10)

        asyncio.run(asyncio.wait_for(drive(), 120))
        _wait(lambda: srv.poll() is not None, 20, "the server to stop on SIGTERM")
        assert srv.returncode == 130


def test_cli_sender_does_not_hang_on_a_peer_that_never_reads() -> None:
    with _stuck_peer() as (port, _conns), _cli(
        "migrate", "send", "--port", str(port), "--size", "64M", "--plugged", "32M", "--low", "0",
        "--timeout", "2", "--quiet",
    ) as tx:  # fmt: skip
        _wait(lambda: tx.poll() is not None, 60, "the sender to give up")
        assert tx.stderr is not None
        err = tx.stderr.read().strip().splitlines()
    assert tx.returncode == 1 and len(err) == 1 and "read nothing for 2 s" in err[0]


# -- item 5 ------------------------------------------------------------------------------------


def _demo_receiver_case(payload: bytes) -> tuple[int, int, str]:
    """RSS (kB) of a demo receiver before and after ``payload``, and its error line."""
    with _cli(
        "migrate", "receive", "--port", "0", "--size", "64M", "--low", "0", "--timeout", "5", "--quiet"
    ) as rx:
        port = _listening_port(rx)
        before = _proc_kib(rx.pid, "VmRSS")
        peak = before
        with socket.create_connection(("127.0.0.1", port)) as s:
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the receiver refused early and closed
            deadline = time.monotonic() + 60
            while rx.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(AssertionError, OSError):  # it may exit meanwhile
                    peak = max(peak, _proc_kib(rx.pid, "VmHWM"))
                time.sleep(0.02)
        _wait(lambda: rx.poll() is not None, 30, "the receiver to refuse")
        assert rx.stderr is not None
        err = rx.stderr.read().strip().splitlines()
    assert rx.returncode == 1 and len(err) == 1, err
    return before, peak, err[0]


@pytest.mark.parametrize("case", ["8000-sections", "64k-name", "256m-section", "300-regions"])
def test_hostile_stream_sizes_are_bounded_by_the_receiver(case: str) -> None:
    header = encode_stream_header(checksum=Checksum.CRC32)
    if case == "8000-sections":
        names = "n" * MAX_NAME
        payload = header + b"".join(
            encode_region(RegionInfo(i, RegionKind.WHOLE, MiB, 0, 4096, names, names)) for i in range(8000)
        )
    elif case == "64k-name":
        import struct

        name = b"x" * 65000
        body = struct.pack("<IIQQQHH", 0, 0, MiB, 0, 4096, len(name), 0) + name
        payload = header + section(SectionType.REGION, body)
    elif case == "256m-section":
        payload = header + _section_header(SectionType.REGION, 256 * MiB, 0)
    else:
        payload = header + b"".join(
            encode_region(RegionInfo(i, RegionKind.WHOLE, MiB, 0, 4096, "r" * 1000, "")) for i in range(300)
        )
    before, peak, err = _demo_receiver_case(payload)
    # The receiver's own machine is 64 MiB of lazily populated RAM; what the stream
    # announces (up to 256 MiB, 16 MB of names) must not be held.
    assert (peak - before) * 1024 < 64 * MiB
    assert len(err) < 400
    assert "geometry mismatch" in err or "longer than" in err or "limit" in err


# -- item 6 ------------------------------------------------------------------------------------


def test_qmp_connection_cap_greets_a_fresh_client_under_a_junk_flood(tmp_path: Path) -> None:
    from ramdiscard.qmp.protocol import DEFAULT_MAX_MESSAGE
    from ramdiscard.qmp.server import DEFAULT_MAX_CLIENTS, DEFAULT_MAX_OUTPUT

    scenario = _scenario(tmp_path)
    flood: list[socket.socket] = []
    with _cli("serve", str(scenario), "--qmp", "tcp:127.0.0.1:0") as srv:
        assert srv.stderr is not None
        m = re.search(r"tcp:127\.0\.0\.1:(\d+)", srv.stderr.readline())
        assert m is not None
        addr = ("127.0.0.1", int(m.group(1)))
        rss_before = _proc_kib(srv.pid, "VmRSS")
        try:
            for _ in range(4 * DEFAULT_MAX_CLIENTS):
                c = socket.create_connection(addr, timeout=10)
                c.setblocking(False)
                for _k in range(4):
                    try:
                        c.send(b"}" * 65536)
                    except OSError:
                        break
                flood.append(c)
            with socket.create_connection(addr, timeout=10) as fresh:
                greeting = json.loads(fresh.makefile("rb").readline())
            assert "QMP" in greeting
            rss_after = _proc_kib(srv.pid, "VmRSS")
            bound = DEFAULT_MAX_CLIENTS * (DEFAULT_MAX_MESSAGE + DEFAULT_MAX_OUTPUT + 256 * 1024)
            assert (rss_after - rss_before) * 1024 < bound
            # Dropped connections are closed by the server's loop as it gets to them: wait
            # (bounded) for the descriptors to settle under the cap.
            _wait(lambda: _fd_count(srv.pid) < DEFAULT_MAX_CLIENTS + 64, 20, "descriptors under the cap")
        finally:
            for c in flood:
                c.close()
        srv.send_signal(signal.SIGTERM)
        _wait(lambda: srv.poll() is not None, 30, "the server to stop")


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_select_call_in_the_sources() -> None:
    offenders = [
        f"{p}:{n}"
        for p in SRC.rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\bselect\s*\(", line) and not line.lstrip().startswith("#")
    ]
    assert offenders == []


# -- item 10 -----------------------------------------------------------------------------------


def test_strict_json_and_exit_130_on_sigterm(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    sock = str(tmp_path / "qmp.sock")
    with _cli("serve", str(scenario), "--qmp", f"unix:{sock}") as srv:
        _wait(lambda: os.path.exists(sock), 30, "the QMP socket")
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(sock)
        f = c.makefile("rb")
        f.readline()
        c.sendall(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 1e999}\n')
        lines = [f.readline(), f.readline()]
        for raw in lines:
            json.loads(raw, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
        reply = json.loads(lines[1])
        assert "error" in reply and "out of range" in reply["error"]["desc"]
        c.close()
        srv.send_signal(signal.SIGTERM)
        _wait(lambda: srv.poll() is not None, 30, "the server to stop")
    assert srv.returncode == 130


def test_qmp_tcp_migration_pairs_with_migrate_receive_scenario(tmp_path: Path) -> None:
    scenario = _scenario(tmp_path)
    sock = str(tmp_path / "qmp.sock")
    with (
        _cli(
            "migrate", "receive", "--scenario", str(scenario), "--port", "0", "--timeout", "30", "--json"
        ) as rx,
        _cli("serve", str(scenario), "--qmp", f"unix:{sock}") as srv,
    ):
        port = _listening_port(rx)
        _wait(lambda: os.path.exists(sock), 30, "the QMP socket")

        async def drive() -> dict[str, object]:
            q = QMPClient("m")
            await q.connect(sock)
            await q.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 32 * MiB})
            for _ in range(1500):
                devs: Any = await q.execute("query-memory-devices")
                dev = devs[0]
                if dev["data"]["size"] == 32 * MiB:
                    break
                await asyncio.sleep(0.02)
            out = await q.execute("x-ramdiscard-migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            await q.execute("quit")
            assert isinstance(out, dict)
            return out

        stats = asyncio.run(asyncio.wait_for(drive(), 60))
        _wait(lambda: rx.poll() is not None, 30, "the receiver")
        assert rx.stdout is not None
        row = json.loads(rx.stdout.read())
        _wait(lambda: srv.poll() is not None, 30, "the server")
    assert rx.returncode == 0 and row["plugged"] == 32 * MiB and stats["page-bytes"] == row["page_bytes"]


def test_replay_of_an_oversized_discard_names_the_trace_line(tmp_path: Path) -> None:
    trace = tmp_path / "t.log"
    trace.write_text(
        "1@1.0:memory_device_pre_plug id=vmem0 addr=0x100000000\n"
        "1@1.1:ram_block_discard_range @0x7f0000000000 + 0x7fffffffffff0000: madvise: 1 fallocate: 0 ret: 0\n"
    )
    with _cli("replay", str(trace)) as p:
        _, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert f"{trace}:2:" in err and "devices[0]" not in err and len(err.strip().splitlines()) == 1
