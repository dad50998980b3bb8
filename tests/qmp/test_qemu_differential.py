"""The same QMP command sequences sent to a real QEMU and to ``ramdiscard serve``.

QEMU runs with ``-S``, no disk, TCG, a 256 MiB machine and a 1 GiB virtio-mem-pci
device ``vm0`` (2 MiB blocks) whose memory backend is ``vm0-mem`` (ramdiscard's name for
it); ``ramdiscard serve`` runs the same geometry. Both are driven through qemu.qmp (raw
sockets where the order of bytes on the wire is the point) and their replies compared:
error classes and texts, shapes and values. QEMU is sent ``cont`` first so both run.

Differences that come only from QEMU having no guest driver (documented in docs/qmp.md,
and the only ones tolerated here):

* ``size`` (plugged memory) stays 0 in QEMU after requested-size grows, since nothing
  plugs; ramdiscard's modelled guest plugs. Sequences keep requested-size at 0 where
  sizes are compared, and ``size`` is compared only there.
* QEMU's "firmware" is 64 KiB of HLT instructions, so after ``cont`` its CPU halts at
  the reset vector and nothing but QMP changes the machine.
* Not from the missing guest but deliberate (docs/qmp.md): QEMU's greeting offers
  ``oob``, ramdiscard does not implement out-of-band execution; changing a memory
  backend's ``dump``/``merge``/``policy``/``prealloc``... at run time is refused; QEMU
  lists ``/objects`` in hash order (query-memdev is compared sorted).
* A dump's ``completed``/``total`` count what was written: QEMU writes all of its RAM,
  ramdiscard only populated memory; their status is compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from ramdiscard.units import GiB, MiB

from .qemu_binary import find_qemu

QEMU, WHY = find_qemu()
pytestmark = [pytest.mark.skipif(QEMU is None, reason=WHY), pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
DEV, MEMDEV = "vm0", "vm0-mem"
PATH = f"/machine/peripheral/{DEV}"
SCENARIO = f"""
name = "differential"
boot-ram = "256M"
[[devices]]
id = "{DEV}"
size = "1G"
block-size = "2M"
addr = {4 * GiB}
"""


RUNTIME_BACKEND_PROPS = frozenset(
    {"dump", "merge", "policy", "host-nodes", "prealloc", "prealloc-threads", "prealloc-context",
     "x-use-canonical-path-for-ramblock-id"}
)  # fmt: skip
"""Backend properties QEMU re-applies to host memory at run time; ramdiscard refuses a
change (deliberate, docs/qmp.md), so here the replies are expected to differ that way."""


def _wait_socket(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists():
            return
        if proc.poll() is not None:
            raise AssertionError(
                f"{what} exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''!r}"
            )
        time.sleep(0.02)
    raise AssertionError(f"{what} did not create {path} within 30 s")


def _start_qemu(work: Path) -> tuple[subprocess.Popen[bytes], list[Path]]:
    assert QEMU is not None
    socks = [work / "qemu-a.sock", work / "qemu-b.sock"]
    # A BIOS of nothing but HLT: after cont the CPU halts at the reset vector (interrupts
    # are off), so no guest code runs and nothing but QMP changes the machine.
    bios = work / "halt.bin"
    bios.write_bytes(b"\xf4" * 65536)
    cmd = [
        str(QEMU), "-bios", str(bios), "-S", "-nodefaults", "-display", "none", "-accel", "tcg",
        "-m", "256M,maxmem=4G", "-object", f"memory-backend-ram,id={MEMDEV},size=1G",
        "-device", f"virtio-mem-pci,id={DEV},memdev={MEMDEV},block-size=2M,requested-size=0",
    ]  # fmt: skip
    for s in socks:
        cmd += ["-qmp", f"unix:{s},server=on,wait=off"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_socket(socks[-1], proc, "qemu")
    return proc, socks


def _start_ramdiscard(work: Path) -> tuple[subprocess.Popen[bytes], list[Path]]:
    scenario = work / "differential.toml"
    scenario.write_text(SCENARIO)
    sock = work / "rd.sock"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "serve", str(scenario), "--qmp", f"unix:{sock}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    _wait_socket(sock, proc, "ramdiscard serve")
    return proc, [sock, sock]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stderr is not None:
        proc.stderr.close()


class Side:
    """One implementation under test: its process, sockets and a qemu.qmp client."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], socks: list[Path]) -> None:
        self.name, self.proc, self.socks = name, proc, socks
        self.qmp = QMPClient(name)
        self.events = EventListener()

    async def run(self, cmd: str, args: dict[str, Any] | None = None) -> tuple[str, Any]:
        """("ok", return value) or (error class, error text)."""
        try:
            return "ok", await asyncio.wait_for(self.qmp.execute(cmd, args or {}), 30)
        except ExecuteError as exc:
            return exc.error.error.class_, exc.error.error.desc

    def drain(self) -> list[dict[str, Any]]:
        out = []
        for ev in self.events.clear():
            data = dict(ev.get("data", {}))
            if data.get("guest") is True:
                continue  # QEMU's firmware resetting the machine: not a QMP outcome
            out.append({"event": ev["event"], "data": data})
        return out


@asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Side, Side]]:
    qemu_proc, qemu_socks = _start_qemu(tmp_path)
    try:
        rd_proc, rd_socks = _start_ramdiscard(tmp_path)
    except BaseException:
        _stop(qemu_proc)
        raise
    sides = (Side("qemu", qemu_proc, qemu_socks), Side("ramdiscard", rd_proc, rd_socks))
    try:
        for side in sides:
            await asyncio.wait_for(side.qmp.connect(str(side.socks[0])), 30)
            side.qmp.register_listener(side.events)
        assert await sides[0].run("cont") == ("ok", {})
        yield sides
    finally:
        for side in sides:
            with contextlib.suppress(Exception):  # a side that quit already hung up
                await asyncio.wait_for(side.qmp.disconnect(), 10)
            _stop(side.proc)


def same(qemu: Side, rd: Side) -> Callable[..., Awaitable[tuple[str, Any]]]:
    async def check(cmd: str, args: dict[str, Any] | None = None) -> tuple[str, Any]:
        a, b = await qemu.run(cmd, args), await rd.run(cmd, args)
        assert a == b, f"{cmd} {args}: qemu {a!r} != ramdiscard {b!r}"
        return a

    return check


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 110))  # type: ignore[arg-type]


def test_greeting_version_status_and_memory_queries(tmp_path: Path) -> None:
    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            check = same(qemu, rd)
            for side in (qemu, rd):
                assert side.qmp.greeting is not None
            greetings = [s.qmp.greeting._raw["QMP"] for s in (qemu, rd)]  # type: ignore[union-attr]
            assert greetings[0]["version"]["qemu"] == greetings[1]["version"]["qemu"]
            # Out-of-band execution is not implemented, so not offered (docs/qmp.md).
            assert greetings[0]["capabilities"] == ["oob"] and greetings[1]["capabilities"] == []
            assert greetings[1]["version"]["package"].startswith("ramdiscard ")
            assert (await qemu.run("query-version"))[1]["qemu"] == (await rd.run("query-version"))[1]["qemu"]
            await check("query-status")
            await check("query-memory-devices")
            memdevs = [sorted((await s.run("query-memdev"))[1], key=lambda m: m["id"]) for s in (qemu, rd)]
            assert memdevs[0] == memdevs[1]  # QEMU lists /objects in hash order
            await check("query-memory-size-summary")
            await check("query-dump")
            for t in ("virtio-mem-pci", "virtio-mem", "memory-backend-ram", "nope-type"):
                await check("qom-list-properties", {"typename": t})
            for t in ("virtio-mem-pci", "nope-type"):
                await check("device-list-properties", {"typename": t})
            ours = {c["name"] for c in (await rd.run("query-commands"))[1]}
            theirs = {c["name"] for c in (await qemu.run("query-commands"))[1]}
            assert {n for n in ours if not n.startswith("x-ramdiscard-")} <= theirs

    run(body())


async def _compare_object(check: Callable[..., Awaitable[Any]], qemu: Side, rd: Side, path: str) -> int:
    """qom-list as sets, then every property read and written; returns the count."""
    a, b = await qemu.run("qom-list", {"path": path}), await rd.run("qom-list", {"path": path})
    assert a[0] == b[0] == "ok", (a, b)
    as_set = {(p["name"], p["type"]) for p in a[1]}
    assert as_set == {(p["name"], p["type"]) for p in b[1]}, path
    for name, ptype in sorted(as_set):
        if ptype.startswith("child<"):
            continue
        value = await check("qom-get", {"path": path, "property": name})
        if name in ("requested-size", "realized") or value[0] != "ok":
            continue
        v = value[1]
        new = (not v) if isinstance(v, bool) else (v + 4096 if isinstance(v, int) else v)
        args = {"path": path, "property": name, "value": new}
        if path.startswith("/objects/") and name in RUNTIME_BACKEND_PROPS:
            a, b = await qemu.run("qom-set", args), await rd.run("qom-set", args)
            assert a == b or (
                a == ("ok", {}) and b[0] == "GenericError" and b[1].startswith("ramdiscard: ")
            ), (a, b)
            continue
        await check("qom-set", args)
    return len(as_set)


def test_qom_tree_properties_values_and_set_errors(tmp_path: Path) -> None:
    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            check = same(qemu, rd)
            counts = {}
            for path in (PATH, f"{PATH}/virtio-backend", f"/objects/{MEMDEV}", "/objects/pc.ram"):
                counts[path] = await _compare_object(check, qemu, rd, path)
            assert counts[PATH] >= 70 and counts[f"{PATH}/virtio-backend"] >= 25
            for prop in ("nope", "type"):
                await check("qom-set", {"path": PATH, "property": prop, "value": 1})
            await check("qom-get", {"path": PATH, "property": "nope"})
            await check("qom-get", {"path": "/machine/peripheral/nope", "property": "size"})
            await check("qom-list", {"path": "/machine/peripheral/nope"})
            await check("qom-set", {"path": f"{PATH}/virtio-backend", "property": "realized", "value": True})

    run(body())


def test_requested_size_values_and_errors(tmp_path: Path) -> None:
    bad: list[Any] = [
        1,
        MiB,
        3 * MiB,
        GiB + 2 * MiB,
        2 * GiB,
        -1,
        -(2 * MiB),
        1 << 64,
        1.5,
        "1G",
        None,
        True,
        [],
        {},
    ]

    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            check = same(qemu, rd)
            for value in bad:
                await check("qom-set", {"path": PATH, "property": "requested-size", "value": value})
            await check("qom-get", {"path": PATH, "property": "requested-size"})
            await check("qom-set", {"path": DEV, "property": "requested-size", "value": 0})
            await check("qom-set", {"path": PATH, "property": "requested-size", "value": 64 * MiB})
            await check("qom-get", {"path": f"{PATH}/virtio-backend", "property": "requested-size"})

    run(body())


def test_stop_cont_reset_events_and_status(tmp_path: Path) -> None:
    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            check = same(qemu, rd)
            await asyncio.sleep(0.2)
            qemu.drain(), rd.drain()
            for cmd in ("stop", "stop", "cont", "cont", "stop", "system_reset", "cont"):
                await check(cmd)
                await check("query-status")
            await asyncio.sleep(0.3)
            a, b = qemu.drain(), rd.drain()
            assert (
                [e["event"] for e in a]
                == [e["event"] for e in b]
                == ["STOP", "RESUME", "STOP", "RESET", "RESUME"]
            )
            assert a == b

    run(body())


def test_dump_guest_memory_argument_form(tmp_path: Path) -> None:
    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            check = same(qemu, rd)
            for args in (
                {"protocol": "file:/x"},
                {"paging": False},
                {"paging": False, "protocol": "nope:/x"},
                {"paging": "no", "protocol": "file:/x"},
                {"paging": False, "protocol": "file:/x", "begin": 0},
                {"paging": False, "protocol": "file:/x", "length": 4096},
                {"paging": False, "protocol": "file:/x", "format": "nope"},
                {"paging": True, "protocol": "file:/x", "format": "kdump-zlib"},
                {"paging": False, "protocol": "file:/x", "bogus": 1},
            ):
                await check("dump-guest-memory", args)
            await check("query-dump")
            for side in (qemu, rd):
                side.drain()
                out = tmp_path / f"{side.name}.elf"
                assert await side.run("dump-guest-memory", {"paging": False, "protocol": f"file:{out}"}) == (
                    "ok",
                    {},
                )
                assert out.read_bytes()[:4] == b"\x7fELF"
            statuses = [(await s.run("query-dump"))[1]["status"] for s in (qemu, rd)]
            assert statuses == ["completed", "completed"]
            events = [[e["event"] for e in s.drain()] for s in (qemu, rd)]
            assert events[0] == events[1] == ["STOP", "DUMP_COMPLETED", "RESUME"]

    run(body())


def _raw_client(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(30)
    c.connect(str(path))
    f = c.makefile("rb")
    json.loads(f.readline())
    c.sendall(b'{"execute": "qmp_capabilities"}\n')
    assert "return" in json.loads(f.readline())
    return c


def _read_all(c: socket.socket) -> list[dict[str, Any]]:
    """Everything until the server hangs up (QEMU exits without a graceful close, so a
    reset after its last byte counts as hanging up)."""
    data = b""
    try:
        while chunk := c.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    c.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_quit_sends_shutdown_to_every_client_before_the_return(tmp_path: Path) -> None:
    async def body() -> None:
        async with pair(tmp_path) as (qemu, rd):
            await qemu.qmp.disconnect()
            await rd.qmp.disconnect()
            seen = {}
            for side in (qemu, rd):
                quitter, other = _raw_client(side.socks[0]), _raw_client(side.socks[1])
                quitter.sendall(b'{"execute": "quit", "id": 7}\n')
                got = await asyncio.to_thread(_read_all, quitter), await asyncio.to_thread(_read_all, other)
                seen[side.name] = [
                    [m.get("event", "return") for m in msgs if m.get("data", {}).get("guest") is not True]
                    for msgs in got
                ]
                assert side.proc.wait(30) == 0
            assert seen["qemu"] == seen["ramdiscard"] == [["SHUTDOWN", "return"], ["SHUTDOWN"]]

    run(body())
