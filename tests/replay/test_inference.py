"""Replay infers requested-size from every event that implies it (issue 16).

The logs here are written in QEMU 10's trace format by a small builder that follows
QEMU's own rules: a requested-size write is logged only when the usable region does not
shrink, an unplug-all (guest request or system reset) logs ``unplugged_all`` and then the
resize it does with shrinking allowed, and only unplugs of plugged memory discard.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ramdiscard.replay.events import parse_trace
from ramdiscard.replay.trace import ReplayReport, replay_trace, requested_sizes_for, usable_region_for
from ramdiscard.units import GiB, MiB
from tests.conftest import shared_dir
from tests.providers.virtio_mem.conftest import ADDR, BS, Factory

HOST = 0x7F0000000000
EXTENT = 256 * MiB


def usable(requested: int, region: int = 4 * GiB) -> int:
    return 0 if requested == 0 else min(region, requested + EXTENT)


class QemuLog:
    """Writes what QEMU 10 logs for a virtio-mem device at ``ADDR`` with 2 MiB blocks."""

    def __init__(self, region: int = 4 * GiB, requested: int = 0) -> None:
        self.region = region
        self.lines: list[str] = []
        self.t = 0.0
        self.usable = usable(requested, region)
        self.plugged = 0
        self._add(1, "memory_device_pre_plug", f"id=vmem0 addr={ADDR:#x}")
        self._add(
            1, "ram_block_discard_range", f"vmem0@{HOST:#x} + {region:#x}: madvise: 1 fallocate: 0 ret: 0"
        )
        self._add(1, "virtio_mem_resized_usable_region", f"old_size=0x0 new_size={self.usable:#x}")
        self._add(1, "memory_device_plug", f"id=vmem0 addr={ADDR:#x}")

    def _add(self, pid: int, name: str, args: str = "") -> None:
        self.t += 0.001
        self.lines.append(f"{pid}@{self.t:.6f}:{name} {args}")

    def write_requested(self, value: int) -> None:
        new = usable(value, self.region)
        if new >= self.usable:  # QEMU logs only a resize that does not shrink
            self._add(1, "virtio_mem_resized_usable_region", f"old_size={self.usable:#x} new_size={new:#x}")
            self.usable = new

    def plug(self, offset: int, blocks: int, answer: int = 0) -> None:
        self._add(2, "virtio_mem_plug_request", f"addr={ADDR + offset:#x} nb_blocks={blocks}")
        self._add(2, "virtio_mem_send_response", f"type={answer}")
        if answer == 0:
            self.plugged += blocks * BS

    def unplug(self, offset: int, blocks: int) -> None:
        self._add(2, "virtio_mem_unplug_request", f"addr={ADDR + offset:#x} nb_blocks={blocks}")
        self._add(2, "ram_block_discard_range", f"vmem0@{HOST + offset:#x} + {blocks * BS:#x}: ret: 0")
        self._add(2, "virtio_mem_send_response", "type=0")
        self.plugged -= blocks * BS

    def _unplug_all(self, pid: int, requested: int) -> None:
        if self.plugged:
            self._add(pid, "ram_block_discard_range", f"vmem0@{HOST:#x} + {self.region:#x}: ret: 0")
            self.plugged = 0
        self._add(pid, "virtio_mem_unplugged_all")
        new = usable(requested, self.region)
        self._add(pid, "virtio_mem_resized_usable_region", f"old_size={self.usable:#x} new_size={new:#x}")
        self.usable = new

    def reset(self, requested: int) -> None:
        self._unplug_all(1, requested)

    def unplug_all_request(self, requested: int) -> None:
        self._add(2, "virtio_mem_unplug_all_request")
        self._unplug_all(2, requested)
        self._add(2, "virtio_mem_send_response", "type=0")


def replay(make: Factory, log: QemuLog) -> tuple[ReplayReport, int]:
    dev = make.device(log.region, requested_size=0, addr=ADDR, block_size=BS)
    report = replay_trace(parse_trace(log.lines), dev)
    return report, dev.requested_size


def repro() -> list[str]:
    """The issue's repro: plug 64 blocks, unplug them, a reset, the region shrinks to 0."""
    log = QemuLog()
    log.reset(0)  # machine start
    log.write_requested(128 * MiB)
    log.plug(0, 64)
    log.write_requested(0)  # not logged: the usable region would shrink
    log.unplug(0, 64)
    log.reset(0)
    return log.lines


def test_shrink_after_reset_is_replayed_exactly(make: Factory) -> None:
    lines = repro()
    assert len(lines) == 14
    dev = make.device(4 * GiB, requested_size=0, addr=ADDR, block_size=BS)
    report = replay_trace(parse_trace(lines), dev)
    assert report.ok, report.mismatches
    assert report.usable_region_sizes == [0, 0, usable(128 * MiB), 0]
    assert report.requested_size_writes == [128 * MiB, 0]
    assert dev.requested_size == 0 and dev.usable_region_size == 0


def test_lowered_then_reset_then_raised(make: Factory) -> None:
    log = QemuLog()
    log.write_requested(GiB)
    for i in range(8):
        log.plug(i * 128 * MiB, 64)
    log.write_requested(256 * MiB)
    for i in reversed(range(2, 8)):
        log.unplug(i * 128 * MiB, 64)
    log.reset(256 * MiB)
    log.write_requested(512 * MiB)
    for i in range(4):
        log.plug(i * 128 * MiB, 64)
    report, requested = replay(make, log)
    assert report.ok, report.mismatches
    assert requested == 512 * MiB
    assert report.usable_region_sizes[-2:] == [usable(256 * MiB), usable(512 * MiB)]
    assert report.plugged_sizes[-1] == 512 * MiB


def test_raise_without_growth_and_nack_are_inferred_from_answers(make: Factory) -> None:
    log = QemuLog()
    log.write_requested(GiB)
    log.plug(0, 64)
    log.plug(128 * MiB, 64)
    log.write_requested(128 * MiB)  # not logged
    log.plug(256 * MiB, 64, answer=1)  # the guest raced the lowering: NACK
    log.write_requested(512 * MiB)  # not logged either: 768M < the usable 1.25G
    log.plug(256 * MiB, 64)
    log.plug(384 * MiB, 64)
    log.plug(512 * MiB, 64, answer=1)
    log.reset(512 * MiB)
    report, requested = replay(make, log)
    assert report.ok, report.mismatches
    assert report.responses == {"ACK": 4, "NACK": 2}
    assert requested == 512 * MiB
    assert report.usable_region_sizes[-1] == usable(512 * MiB)


def test_guest_unplug_all_shrinks_like_qemu(make: Factory) -> None:
    log = QemuLog()
    log.write_requested(GiB)
    log.plug(0, 64)
    log.write_requested(0)
    log.unplug_all_request(0)
    log.write_requested(64 * MiB)
    log.plug(0, 32)
    report, requested = replay(make, log)
    assert report.ok, report.mismatches
    assert report.usable_region_sizes == [usable(0), usable(GiB), 0, usable(64 * MiB)]
    assert requested == 64 * MiB


def test_requested_size_set_before_realize(make: Factory) -> None:
    log = QemuLog(requested=GiB)
    log.reset(GiB)
    log.plug(0, 64)
    report, requested = replay(make, log)
    assert report.ok, report.mismatches
    assert requested == GiB and report.usable_region_sizes[0] == usable(GiB)


def test_region_sized_usable_region_is_resolved_by_plug_answers(make: Factory) -> None:
    log = QemuLog(region=GiB)
    log.reset(0)
    log.write_requested(896 * MiB)  # usable = the whole region: 768M+2M .. 1G all fit
    for i in range(7):
        log.plug(i * 128 * MiB, 64)
    log.plug(896 * MiB, 1, answer=1)
    report, requested = replay(make, log)
    assert report.ok, report.mismatches
    assert requested == 896 * MiB


def test_requested_sizes_for_inverts_the_usable_rule(make: Factory) -> None:
    dev = make.device(GiB, requested_size=0, addr=ADDR, block_size=BS)
    for requested in range(0, GiB + 1, 2 * BS + BS):
        requested -= requested % BS
        span = requested_sizes_for(dev, usable_region_for(dev, requested))
        assert span is not None and span[0] <= requested <= span[1]
    assert requested_sizes_for(dev, BS) is None  # below requested + extent for any requested > 0
    assert requested_sizes_for(dev, usable_region_for(dev, 64 * MiB) + BS // 2) is None
    big = make.device(4 * GiB, requested_size=0, addr=ADDR + 8 * GiB, block_size=GiB)
    assert requested_sizes_for(big, 2 * GiB) == (GiB, GiB)  # 1G + 256M rounds up to 2G
    assert requested_sizes_for(big, 4 * GiB) == (3 * GiB, 4 * GiB)


def test_real_differences_are_still_reported(make: Factory) -> None:
    log = QemuLog()
    log.write_requested(128 * MiB)
    log.plug(0, 64)
    log.lines.append("2@9.0:virtio_mem_plug_request addr=0x120000000 nb_blocks=1")  # beyond usable
    log.lines.append("2@9.1:virtio_mem_send_response type=0")
    log.lines.append("1@9.2:virtio_mem_resized_usable_region old_size=0x18000000 new_size=0x18100000")
    report, _ = replay(make, log)
    what = [(m.what, m.logged, m.replayed) for m in report.mismatches]
    assert what[0][0].startswith("response to line") and what[0][1:] == (0, 3)  # ACK vs ERROR
    assert ("requested size", 0x18100000, "no requested size gives this usable region") in what
    assert ("usable region size", 0x18100000, usable(128 * MiB)) in what


def test_cli_json_numbers_and_repro_exit_code(tmp_path: Path) -> None:
    from tests.cli.test_cli import cli

    good = tmp_path / "repro.log"
    good.write_text("\n".join(repro()) + "\n")
    r = cli("replay", str(good), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads(r.stdout)["mismatches"] == []
    bad = tmp_path / "bad.log"
    bad.write_text(
        "\n".join([*repro()[:-1], "1@9.0:virtio_mem_resized_usable_region old_size=0x0 new_size=0x1000"])
    )
    r = cli("replay", str(bad), "--json")
    assert r.returncode == 3, r.stderr
    sizes = [m for m in json.loads(r.stdout)["mismatches"] if m["what"] == "usable region size"]
    assert sizes and sizes[0]["logged"] == 0x1000 and isinstance(sizes[0]["replayed"], int)
    r = cli("replay", str(bad))
    assert "logged 0x1000" in r.stdout


def _real_traces() -> list[Path]:
    """Every QEMU trace kept with the project (examples/traces) and in shared/data."""
    root = Path(__file__).resolve().parents[2]
    found = {p.name: p for p in sorted((root / "examples" / "traces").glob("*.log"))}
    shared = shared_dir()
    if shared is not None:
        found.update({p.name: p for p in sorted((shared / "data").glob("*.log")) if p.name not in found})
    return sorted(found.values())


@pytest.mark.parametrize("trace", _real_traces(), ids=lambda p: p.name)
def test_every_real_trace_replays_without_mismatch(trace: Path) -> None:
    from tests.cli.test_cli import cli

    r = cli("replay", str(trace), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["mismatches"] == [] and out["requests"] > 0
