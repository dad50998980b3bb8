"""A real Linux guest (QEMU, TCG) drives ramdiscard's virtio-mem over vhost-user.

Needs the QEMU of scripts/build-qemu.sh (skipped with the one-line reason otherwise) and
apt access for the cached Debian kernel/busybox on first use. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from ramdiscard.cli.guest import GuestMachine
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.qmp import serve_async
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.realguest.launcher import BLOCK_SIZE, DEVICE_ADDR, LOW_RAM, RealGuest, Sizes
from ramdiscard.realguest.memfd import mapped_identities
from ramdiscard.replay.events import parse_trace
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import GiB, MiB
from tests.realguest.needs_qemu import BOOT_MARKS

STEP_TIMEOUT = 180.0

pytestmark = BOOT_MARKS


@pytest.fixture
def guest(tmp_path: object) -> Iterator[RealGuest]:
    started = time.monotonic()
    g = RealGuest(region_size=2 * GiB, requested_size=512 * MiB, on_console=None)
    print(f"boot to the guest's init: {time.monotonic() - started:.1f} s", file=sys.stderr)
    try:
        yield g
    finally:
        g.close()


def settle(g: RealGuest, size: int) -> Sizes:
    """Wait until the device plugged ``size`` and the guest reports a stable MemTotal."""
    g.wait_for(lambda: g.device.plugged_size == size, STEP_TIMEOUT, f"plugged size {size:#x}")
    g.wait_for(lambda: g.pinned_bytes == size, STEP_TIMEOUT, "pins to follow")
    readings: list[int] = []

    def stable() -> bool:
        g.send("memtotal")
        time.sleep(1.0)
        readings.append(g.guest_memtotal())
        return len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]

    g.wait_for(stable, STEP_TIMEOUT, "a stable guest MemTotal")
    sizes = g.sizes()
    print(f"requested {size // MiB} MiB: {sizes}", file=sys.stderr)
    return sizes


def unplugged_resident(g: RealGuest) -> int:
    plugged = sorted(g.device.plugged_ranges())
    total, pos = 0, 0
    for off, length in [*plugged, (g.region_size, 0)]:
        if off > pos:
            total += g.window.resident_bytes(pos, off - pos)
        pos = off + length
    return total


def test_plug_resize_reset_and_replay(guest: RealGuest, tmp_path: Path) -> None:
    g = guest
    steps: list[tuple[int, Sizes]] = [(512 * MiB, settle(g, 512 * MiB))]
    g.send("touch 300")
    g.wait_console("RAMDISCARD-TOUCHED", STEP_TIMEOUT)
    for size in (1 * GiB, 256 * MiB, 0):
        g.set_requested_size(size)
        steps.append((size, settle(g, size)))
        assert unplugged_resident(g) == 0
    base = steps[-1][1].guest_memtotal
    for size, s in steps:
        assert s.plugged == size
        assert s.guest_memtotal - base == size
        assert s.pinned == size and s.vm_pin == size
        assert s.resident <= size

    g.set_requested_size(768 * MiB)
    settle(g, 768 * MiB)
    reset_line = len(g.trace.lines)
    g.events.clear()
    # Through `ramdiscard guest`'s machine, as its QMP system_reset does: QEMU resets, and
    # its RESET event has unplugged the device before the command returns.
    GuestMachine(g).system_reset()
    assert "RESET" in g.events
    after = g.trace.lines[reset_line:]
    unplug_all = next(i for i, line in enumerate(after) if ":virtio_mem_unplugged_all" in line)
    assert not any(":virtio_mem_plug_request" in line for line in after[:unplug_all])
    first_boot, _ = g.wait_console("RAMDISCARD-READY", 1)
    g.wait_console("RAMDISCARD-READY", STEP_TIMEOUT, after=first_boot + 1)
    final = settle(g, 768 * MiB)
    assert final.vm_pin == 768 * MiB
    # The rebooted kernel reserves its own memory (it can differ from the first boot's
    # by a page), so its plugged memory is measured against its own empty MemTotal.
    g.set_requested_size(0)
    rebooted_base = settle(g, 0).guest_memtotal
    assert final.guest_memtotal - rebooted_base == 768 * MiB

    # The recorded log replays against a fresh device with the model's semantics.
    log = parse_trace(g.trace.text().splitlines())
    assert log.events
    region = MemoryRegion.new_ram("replay-mem", 2 * GiB)
    dev = VirtioMem(region, addr=DEVICE_ADDR, block_size=BLOCK_SIZE, requested_size=512 * MiB,
                    policy=DiscardPolicy())  # fmt: skip
    try:
        report = replay_trace(log, dev)
    finally:
        dev.unrealize()
    assert report.requests > 0
    assert report.ok, report.mismatches[:3]
    assert max(report.plugged_sizes) == 1 * GiB and report.plugged_sizes[-1] == 0

    # The log alone (as `ramdiscard guest --trace` writes it) is self-describing: the
    # command line replays it with the geometry and requested sizes it records.
    trace = tmp_path / "guest-trace.log"
    trace.write_text(g.trace.text())
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "replay", str(trace), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mismatches"] == []
    assert out["requests"] == report.requests
    assert out["geometry"]["addr"] == DEVICE_ADDR and out["geometry"]["region_size"] == 2 * GiB
    assert out["peak_plugged"] == max(report.plugged_sizes)


def qemu_fd_identities(pid: int) -> set[tuple[int, int]]:
    """(st_dev, st_ino) of every file QEMU holds open (its /proc/<pid>/fd links)."""
    found: set[tuple[int, int]] = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{name}")
            found.add((st.st_dev, st.st_ino))
    return found


def test_garbage_breaks_the_device_then_a_killed_qemu_is_replaced(guest: RealGuest, tmp_path: Path) -> None:
    """One backend, two QEMUs: the first one's guest breaks the device with garbage and
    is SIGKILLed; the backend releases everything, keeps its QMP, and the second QEMU's
    guest plugs again on the same socket and memfd."""
    g = guest
    first = settle(g, 512 * MiB)
    assert first.plugged == first.pinned == first.vm_pin == 512 * MiB

    # QEMU's guest memory is ramdiscard's memfd: the same file object, mapped over the
    # device region's file range and held open.
    pid = g.qemu_pid
    assert pid is not None
    identity = g.memfd_identity()
    mapped = mapped_identities(pid, g.ram_size, g.region_size)
    assert identity in {(dev, ino) for dev, ino, _off, _len in mapped}, mapped
    assert identity in qemu_fd_identities(pid)
    assert g.qemu_maps_memfd()

    location = g.server.ring_location()
    assert location is not None
    num, _desc, avail, _used = location
    file_offset = avail if avail < LOW_RAM else LOW_RAM + avail - 4 * GiB
    idx = struct.unpack("<H", g.ram.read(file_offset + 2, 2))[0]
    g.ram.write(file_offset + 2, struct.pack("<H", (idx + num + 7) & 0xFFFF))
    g.server.poll_queue()
    g.wait_for(lambda: g.device.broken, STEP_TIMEOUT, "the device to break")
    assert g.device.plugged_size == 512 * MiB and g.dma.pinned_bytes == 512 * MiB
    assert g.qemu_running and g.qmp is not None
    assert g.qmp.execute("query-status")["status"] == "running"
    assert g.device.metrics.protocol_errors == 1

    # ramdiscard's own QMP, served while QEMU dies and is replaced.
    sock = str(tmp_path / "rd.qmp")
    loop = asyncio.new_event_loop()
    serving = serve_async(GuestMachine(g), f"unix:{sock}")
    served = threading.Thread(target=lambda: loop.run_until_complete(serving), daemon=True)
    served.start()
    g.wait_for(lambda: os.path.exists(sock), 30, "ramdiscard's QMP socket")

    def status() -> dict[str, Any]:
        async def ask() -> dict[str, Any]:
            client = QMPClient("restart-test")
            await asyncio.wait_for(client.connect(sock), 30)
            try:
                answer = await asyncio.wait_for(client.execute("x-ramdiscard-status"), 30)
            finally:
                await client.disconnect()
            assert isinstance(answer, dict)
            return answer

        return asyncio.run(ask())

    before = status()
    assert before["qemu-running"] and before["memfd-shared-with-qemu"] is True
    assert before["devices"][0]["broken"] is True

    started = time.monotonic()
    g.kill_qemu()
    released = lambda: not g.server.connected and g.device.plugged_size == 0  # noqa: E731
    g.wait_for(released, STEP_TIMEOUT, "the backend to notice")
    noticed = time.monotonic() - started
    gone = g.sizes(memtotal=0)
    print(f"QEMU killed: backend released in {noticed:.2f} s: {gone}", file=sys.stderr)
    assert gone.plugged == gone.pinned == gone.vm_pin == gone.resident == 0
    assert not g.device.broken  # a vanished frontend is a powered-off machine
    after_kill = status()
    assert after_kill["qemu-running"] is False and after_kill["guest-memtotal"] is None
    assert after_kill["vm-pin"] == after_kill["memfd-resident"] == 0
    assert after_kill["devices"][0]["plugged-size"] == 0
    assert after_kill["devices"][0]["pinned-bytes"] == 0

    started = time.monotonic()
    g.restart_qemu()
    print(f"second boot to the guest's init: {time.monotonic() - started:.1f} s", file=sys.stderr)
    second = settle(g, 512 * MiB)
    assert g.server.connections == 2 and g.boots == 2
    assert second.plugged == second.pinned == second.vm_pin == 512 * MiB
    assert second.resident <= 512 * MiB
    new_pid = g.qemu_pid
    assert new_pid is not None and new_pid != pid
    assert g.qemu_maps_memfd() and identity in qemu_fd_identities(new_pid)
    running = status()
    assert running["qemu-running"] and running["memfd-shared-with-qemu"] is True
    assert running["guest-memtotal"] == second.guest_memtotal
    assert running["devices"][0]["plugged-size"] == 512 * MiB
    # The plugged memory is all of the MemTotal the new guest gained from the device.
    g.set_requested_size(0)
    empty = settle(g, 0)
    assert second.guest_memtotal - empty.guest_memtotal == 512 * MiB
    assert empty.vm_pin == 0 and unplugged_resident(g) == 0

    async def quit_qmp() -> None:
        client = QMPClient("restart-test-quit")
        await asyncio.wait_for(client.connect(sock), 30)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.execute("quit"), 30)
        with contextlib.suppress(Exception):
            await client.disconnect()

    asyncio.run(quit_qmp())
    served.join(timeout=60)
    assert not served.is_alive()
    loop.close()
