"""Postcopy between two ``ramdiscard serve`` processes, driven with QEMU's QMP commands
while the guests write: status flow, events, digests, pins, failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from ramdiscard.units import MiB
from tests.qmp.test_live_migration import (
    BOOT,
    PLUGGED,
    _client,
    _plugged,
    _servers,
    _until,
    _wait_status,
    workdir,
)

__all__ = ["workdir"]  # the fixture, re-used


def _vm_pin(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPin:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmPin line")


async def _postcopy_caps(*clients: QMPClient) -> None:
    caps = [{"capability": c, "state": True} for c in ("postcopy-ram", "postcopy-preempt")]
    for q in clients:
        await q.execute("migrate-set-capabilities", {"capabilities": caps})


async def _start(src: QMPClient, dst: QMPClient) -> int:
    await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    await _postcopy_caps(src, dst)
    return int((await dst.execute("query-migrate"))["socket-address"][0]["port"])


async def _events_until(events: EventListener, last: tuple[str, ...]) -> list[str]:
    statuses: list[str] = []
    while not statuses or statuses[-1] not in last:
        ev = await asyncio.wait_for(events.get(), 60)
        statuses.append(ev["data"]["status"])
    return statuses


async def _quit(*clients: QMPClient) -> None:
    for q in clients:
        with contextlib.suppress(Exception):
            await q.execute("quit")
        with contextlib.suppress(Exception):
            await q.disconnect()


def test_postcopy_with_the_guest_running_on_the_destination(workdir: Path) -> None:
    pids: dict[str, int] = {}

    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        with pytest.raises(ExecuteError, match="Postcopy must be started after"):
            await src.execute("migrate-start-postcopy")
        port = await _start(src, dst)
        # ~2.5 s of background copy: the destination guest writes while pages are missing.
        await src.execute("migrate-set-parameters", {"max-bandwidth": 32 << 20})
        sev, dev = EventListener(("MIGRATION",)), EventListener(("MIGRATION",))
        with src.listen(sev), dst.listen(dev):
            assert await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
            await _wait_status(src, ("active",), 30)
            # virtio-mem answers BUSY while the migration runs: the resize waits.
            await src.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 32 * MiB})
            assert await src.execute("migrate-start-postcopy") == {}
            src_statuses = await _events_until(sev, ("completed", "failed", "cancelled"))
            dst_statuses = await _events_until(dev, ("completed", "failed"))
        info = await src.execute("query-migrate")
        assert src_statuses == ["setup", "active", "postcopy-active", "completed"], info
        assert dst_statuses == ["active", "postcopy-active", "completed"]
        assert info["x-ramdiscard-postcopy"]["unplugged-requests"] == 0
        assert info["ram"]["total"] == BOOT + PLUGGED
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        assert _plugged(await src.execute("query-memory-devices")) == PLUGGED  # was BUSY
        dinfo = await dst.execute("query-migrate")
        pc = dinfo["x-ramdiscard-postcopy"]
        assert pc["faults"] >= 1 and pc["fault-latency-p99-us"] >= pc["fault-latency-p50-us"] > 0
        assert (await dst.execute("query-status"))["status"] == "running"
        # The pending resize travelled with the device state (the destination's guest got
        # BUSY during postcopy and, like Linux, retries after its 50 s timer).
        devs = await dst.execute("query-memory-devices")
        assert devs[0]["data"]["requested-size"] == 32 * MiB and _plugged(devs) == PLUGGED
        status = await dst.execute("x-ramdiscard-status")
        assert status["plugged"] == PLUGGED and status["pinned"] == BOOT + PLUGGED
        assert _vm_pin(pids["dst"]) == BOOT + PLUGGED
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer"))) as (s, d):
        pids["dst"] = _pid_of(workdir, "dst")
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


def _pid_of(workdir: Path, name: str) -> int:
    sock = str(workdir / f"{name}.qmp")
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
                if f"unix:{sock}".encode() in cmd:
                    return int(entry)
    raise AssertionError(f"no process serves {sock}")


def test_postcopy_to_a_paused_destination_gives_equal_digests(workdir: Path) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        port = await _start(src, dst)
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await _wait_status(src, ("active",), 30)
        await src.execute("migrate-start-postcopy")
        info = await _wait_status(src, ("completed", "failed", "cancelled"), 60)
        assert info["status"] == "completed", info
        await _wait_status(dst, ("completed", "failed"), 30)
        assert (await dst.execute("query-status"))["status"] == "paused"
        digest = await src.execute("x-ramdiscard-memory-digest")
        assert digest == await dst.execute("x-ramdiscard-memory-digest")
        status = await dst.execute("x-ramdiscard-status")
        assert status["plugged"] == PLUGGED and status["pinned"] == BOOT + PLUGGED
        await dst.execute("cont")
        assert (await dst.execute("query-status"))["status"] == "running"
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer", "-S"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


@pytest.mark.parametrize("how", ["destination-killed", "cancel"])
def test_failure_during_postcopy_keeps_the_source_copy(workdir: Path, how: str) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        port = await _start(src, dst)
        await src.execute("stop")
        before = await src.execute("x-ramdiscard-memory-digest")
        await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})  # ~20 s of postcopy
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        await _wait_status(src, ("active",), 30)
        await src.execute("migrate-start-postcopy")
        await _wait_status(src, ("postcopy-active",), 30)
        await _wait_status(dst, ("postcopy-active",), 30)
        if how == "cancel":
            await src.execute("migrate_cancel")
        else:
            os.kill(_pid_of(workdir, "dst"), signal.SIGKILL)
        info: dict[str, Any] = await _wait_status(src, ("completed", "failed", "cancelled"), 60)
        assert info["status"] == ("cancelled" if how == "cancel" else "failed"), info
        assert (await src.execute("query-status"))["status"] == "paused"
        assert await src.execute("x-ramdiscard-memory-digest") == before
        status = await src.execute("x-ramdiscard-status")
        assert status["plugged"] == PLUGGED and status["pinned"] == BOOT + PLUGGED
        if how == "cancel":
            dinfo = await _wait_status(dst, ("failed", "completed"), 60)
            assert dinfo["status"] == "failed"
            assert (await dst.execute("query-status"))["status"] == "paused"
            dstatus = await dst.execute("x-ramdiscard-status")
            assert dstatus["plugged"] == 0
        await src.execute("cont")
        assert (await src.execute("query-status"))["status"] == "running"
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


def test_a_destination_without_postcopy_ram_refuses_before_the_switchover(workdir: Path) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        await _until(src, "query-memory-devices", lambda d: _plugged(d) == PLUGGED)
        await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
        await _postcopy_caps(src)
        await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await _wait_status(src, ("failed", "completed", "cancelled"), 30)
        assert info["status"] == "failed"
        assert "postcopy-ram is not enabled on the destination" in info["error-desc"]
        assert (await src.execute("query-status"))["status"] == "running"  # never switched over
        with pytest.raises(ExecuteError, match="Postcopy must be started after"):
            await src.execute("migrate-start-postcopy")
        status = await dst.execute("x-ramdiscard-status")
        assert status["plugged"] == 0
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


async def _passes_then_statuses(events: EventListener, last: tuple[str, ...]) -> list[str]:
    seen: list[str] = []
    while not seen or seen[-1] not in last:
        ev = await asyncio.wait_for(events.get(), 60)
        seen.append(f"pass {ev['data']['pass']}" if ev["event"] == "MIGRATION_PASS" else ev["data"]["status"])
    return seen


def test_migrate_start_postcopy_after_a_precopy_round(workdir: Path) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        port = await _start(src, dst)
        # Round 1 takes about 1.3 s; a downtime limit of 0 never lets the guest's writes converge.
        await src.execute("migrate-set-parameters", {"max-bandwidth": 64 << 20, "downtime-limit": 0})
        events = EventListener(("MIGRATION", "MIGRATION_PASS"))
        with src.listen(events):
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            seen = await _passes_then_statuses(events, ("pass 1",))
            assert (await src.execute("query-status"))["status"] == "running"
            await src.execute("migrate-start-postcopy")
            seen += await _passes_then_statuses(events, ("completed", "failed", "cancelled"))
        statuses = [s for s in seen if not s.startswith("pass")]
        assert statuses == ["setup", "active", "postcopy-active", "completed"], seen
        assert seen.index("pass 1") < seen.index("postcopy-active")
        info = await src.execute("query-migrate")
        pc = info["x-ramdiscard-postcopy"]
        assert pc["switched"] and pc["unplugged-requests"] == 0
        assert 0 < pc["needed-bytes"] < info["ram"]["total"] == BOOT + PLUGGED
        assert info["ram"]["dirty-sync-count"] >= 1
        await _wait_status(dst, ("completed", "failed"), 60)
        dpc = (await dst.execute("query-migrate"))["x-ramdiscard-postcopy"]
        assert dpc["kept-bytes"] + dpc["needed-bytes"] == BOOT + PLUGGED
        assert dpc["kept-bytes"] >= BOOT and dpc["needed-bytes"] == pc["needed-bytes"]
        assert (await dst.execute("query-status"))["status"] == "paused"
        assert await src.execute("x-ramdiscard-memory-digest") == await dst.execute(
            "x-ramdiscard-memory-digest"
        )
        status = await dst.execute("x-ramdiscard-status")
        assert status["plugged"] == PLUGGED and status["pinned"] == BOOT + PLUGGED
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer", "-S"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))


def test_a_postcopy_ram_migration_that_converges_completes_as_precopy(workdir: Path) -> None:
    async def drive(src_sock: str, dst_sock: str) -> None:
        src, dst = await _client(src_sock), await _client(dst_sock)
        port = await _start(src, dst)
        events = EventListener(("MIGRATION",))
        with src.listen(events):
            await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            statuses = await _events_until(events, ("completed", "failed", "cancelled"))
        assert statuses == ["setup", "active", "completed"]
        info = await src.execute("query-migrate")
        assert not info["x-ramdiscard-postcopy"]["switched"] and info["ram"]["postcopy-requests"] == 0
        assert (await src.execute("query-status"))["status"] == "postmigrate"
        with pytest.raises(ExecuteError, match="Postcopy must be started after"):
            await src.execute("migrate-start-postcopy")
        dinfo = await _wait_status(dst, ("completed", "failed"), 60)
        assert dinfo["status"] == "completed" and "x-ramdiscard-postcopy" not in dinfo
        assert (await dst.execute("query-status"))["status"] == "paused"
        assert await src.execute("x-ramdiscard-memory-digest") == await dst.execute(
            "x-ramdiscard-memory-digest"
        )
        status = await dst.execute("x-ramdiscard-status")
        assert status["plugged"] == PLUGGED and status["pinned"] == BOOT + PLUGGED
        await dst.execute("cont")
        assert (await dst.execute("query-status"))["status"] == "running"
        await _quit(src, dst)

    with _servers(workdir, ("src", ()), ("dst", ("--incoming", "defer", "-S"))) as (s, d):
        asyncio.run(asyncio.wait_for(drive(s, d), 150))
