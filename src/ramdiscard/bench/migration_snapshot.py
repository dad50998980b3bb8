"""Background snapshot benchmark rows of :mod:`ramdiscard.bench.migration` (described
there)."""

from __future__ import annotations

import threading
import time
from typing import Any

from ramdiscard.bench.migration_guest import WRITE_RATE, BenchGuest
from ramdiscard.units import MiB, format_size

SNAPSHOT_P99_TARGET = 0.005


def _p99(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(len(ys) * 0.99))] if ys else 0.0


def run_snapshot(src: BenchGuest, plugged: int) -> list[dict[str, Any]]:
    """The snapshot rows, on ``src`` (``plugged`` bytes plugged and filled; the writer
    changes its content, nothing else)."""
    import os
    import tempfile

    from ramdiscard.guest.writer import DeviceTarget, GuestWriter
    from ramdiscard.migration.snapshot import background_snapshot

    region = src.dev.region_size
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], threading.RLock(), rate=WRITE_RATE, seed=9)
    fd, path = tempfile.mkstemp(prefix="rd-bench-snap-", dir="/var/tmp")
    try:
        writer.start()
        time.sleep(0.2)
        writer.page_latencies(reset=True)
        with open(fd, "wb", closefd=False) as f:
            snap = background_snapshot(src.space, [src.dev], f, writer, timeout=120)
        during = writer.page_latencies(reset=True)
        time.sleep(max(0.5, snap.total_time))
        quiet = writer.page_latencies(reset=True)
        st = os.fstat(fd)
    finally:
        writer.stop()
        os.close(fd)
        os.unlink(path)
    p99, base = _p99(during), _p99(quiet)
    tag = f"{format_size(region)}-region-{format_size(plugged)}-plugged"
    alloc = st.st_blocks * 512
    want = plugged + -(-snap.metadata_bytes // 4096) * 4096
    return [
        {
            "group": "migration",
            "name": f"snapshot-{tag}-write-p99",
            "ours_ns": int(p99 * 1e9),
            "raw_ns": int(base * 1e9),
            "target_ns_per_run": int(SNAPSHOT_P99_TARGET * 1e9),
            "ns_per_run": int(p99 * 1e9),
            "p50_us": round(sorted(during)[len(during) // 2] * 1e6, 1) if during else None,
            "max_ms": round(max(during) * 1e3, 2) if during else None,
            "writes": len(during),
            "faults": snap.faults,
            "pause_ms": round(snap.pause_time * 1e3, 1),
            "snapshot_s": round(snap.total_time, 2),
            "baseline": "p99 of the same writer without a snapshot",
        },
        {
            "group": "migration",
            "name": f"snapshot-{tag}-file",
            "ratio": alloc / want,
            "target": 1.001,
            "fs_extra_bytes": alloc - want,
            "allocated_bytes": alloc,
            "plugged_MiB": plugged // MiB,
            "metadata_bytes": snap.metadata_bytes,
            "apparent_MiB": round(st.st_size / MiB, 1),
            "baseline": "plugged + metadata",
        },
    ]
