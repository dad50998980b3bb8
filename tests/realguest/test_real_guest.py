"""A real Linux guest (QEMU, TCG) drives ramdiscard's virtio-mem over vhost-user.

Needs the QEMU of scripts/build-qemu.sh (skipped with the one-line reason otherwise) and
apt access for the cached Debian kernel/busybox on first use. Every wait is bounded.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramdiscard.cli.guest import GuestMachine
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.realguest.launcher import BLOCK_SIZE, DEVICE_ADDR, LOW_RAM, RealGuest, Sizes
from ramdiscard.realguest.qemu import QemuNotFound, find_qemu
from ramdiscard.replay.events import parse_trace
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import GiB, MiB

STEP_TIMEOUT = 180.0

try:
    find_qemu()
    NO_QEMU = ""
except QemuNotFound as exc:
    NO_QEMU = str(exc)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900), pytest.mark.skipif(bool(NO_QEMU), reason=NO_QEMU)]


@pytest.fixture
def guest(tmp_path: object) -> Iterator[RealGuest]:
    g = RealGuest(region_size=2 * GiB, requested_size=512 * MiB, on_console=None)
    try:
        yield g
    finally:
        g.close()


def settle(g: RealGuest, size: int) -> Sizes:
    """Wait until the device plugged ``size`` and the guest reports a stable MemTotal."""
    g.wait_for(lambda: g.device.plugged_size == size, STEP_TIMEOUT, f"plugged size {size:#x}")
    g.wait_for(lambda: g.dma.pinned_bytes == size, STEP_TIMEOUT, "pins to follow")
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


def test_garbage_in_the_queue_breaks_the_device_not_the_process(guest: RealGuest) -> None:
    g = guest
    settle(g, 512 * MiB)
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
