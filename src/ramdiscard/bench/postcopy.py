"""Postcopy benchmark: page-fault latency on the destination while the guest writes.

A 4 GiB region with 1 GiB plugged (quick: 1 GiB / 256 MiB) in spread runs; the source
guest writes 50 MiB/s of random 4 KiB pages until the switchover, the destination guest
50 MiB/s from the moment it runs, so most of its writes hit pages not arrived yet. Pure
postcopy over loopback (:mod:`ramdiscard.migration.postcopy_source` /
:mod:`~ramdiscard.migration.postcopy_dest`), the fault handler in its own process.

Rows (same process, runs interleaved): fault latency p99 (fault message read to page
placed, per faulting page) with the priority channel (``postcopy-preempt``) against the
same without it (answers queued behind background pages on the main channel), target
5 ms; p50, the destination writer's own page-write p99 during postcopy, faults,
zero-page faults (stray touches of unplugged blocks, resolved locally), requests the
source got for unplugged memory (must be 0), total time and downtime as notes.
Second row: precopy then postcopy (QEMU's flow): ``migrate-start-postcopy`` right after
the first precopy round completed; its faults against the pure postcopy's (same
process), fault p99, and the bytes still needed at the switchover against plugged.
A run that raises makes its row a failed row (``failed``: its error); the other row
still reports.
"""

from __future__ import annotations

import ctypes
import socket
import statistics
import threading
import time
from typing import Any

from ramdiscard.bench.migration_guest import WRITE_RATE, BenchGuest
from ramdiscard.units import GiB, MiB, format_size

P99_TARGET = 0.005
PROBES = 16
"""Stray destination touches of unplugged blocks per run."""


def _pct(xs: list[float], q: float) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(len(ys) * q))] if ys else 0.0


def one_run(region: int, plugged: int, preempt: bool, rounds: int = 0) -> dict[str, Any]:
    """One postcopy between two fresh guests, switched over once ``rounds`` precopy
    rounds completed; its figures (seconds, counts)."""
    from ramdiscard.guest.writer import DeviceTarget, GuestWriter
    from ramdiscard.migration import postcopy_wire as w
    from ramdiscard.migration.postcopy_dest import receive_postcopy
    from ramdiscard.migration.postcopy_source import PostcopySource
    from ramdiscard.migration.precopy import PrecopyParams

    src, dst = BenchGuest(region, 2 * MiB), BenchGuest(region, 2 * MiB)
    swriter = GuestWriter([DeviceTarget(src.dev, src.ram)], threading.RLock(), rate=WRITE_RATE, seed=3)
    dwriter = GuestWriter([DeviceTarget(dst.dev, dst.ram)], threading.RLock(), rate=WRITE_RATE, seed=4)
    out: dict[str, Any] = {}
    ls = socket.create_server(("127.0.0.1", 0))
    try:
        src.plug_spread(plugged)
        src.fill()
        unplugged = [s for s, _n in src.dev.discarded_runs()][:PROBES]
        probe = ctypes.create_string_buffer(4096)

        def running() -> None:
            dwriter.page_latencies(reset=True)
            dwriter.start()
            for s in unplugged:  # a stray guest read of an unplugged block
                ctypes.memmove(probe, dst.ram.host_address + s, 4096)

        def receive() -> None:
            try:
                conn, _peer = ls.accept()
                with conn:
                    conn.recv(len(w.MAIN_PREAMBLE), socket.MSG_WAITALL)
                    out["dst"] = receive_postcopy(
                        conn, ls, dst.space, [dst.dev], io_timeout=60, on_running=running,
                        on_failure=dwriter.stop,
                    )  # fmt: skip
            except BaseException as exc:
                out["error"] = exc

        rx = threading.Thread(target=receive, daemon=True)
        rx.start()
        swriter.start()
        time.sleep(0.2)
        source = PostcopySource(
            src.space, [src.dev], "127.0.0.1", ls.getsockname()[1], swriter, preempt=preempt,
            timeout=120, io_timeout=60, params=PrecopyParams(downtime_limit=-1.0),
        )  # fmt: skip
        if rounds == 0:
            source.start.set()
        else:

            def switch() -> None:  # migrate-start-postcopy once the rounds are done
                while len(source.stats.round_bytes) < rounds and not source.cancel.wait(0.001):
                    pass
                source.start.set()

            threading.Thread(target=switch, daemon=True).start()
        st = source.run()
        rx.join(120)
        writes = dwriter.page_latencies(reset=True)
    finally:
        swriter.stop()
        dwriter.stop()
        ls.close()
        src.close()
        dst.close()
    if "error" in out:
        raise RuntimeError(f"postcopy bench: the destination failed: {out['error']}")
    d = out["dst"]
    return {
        "p50": _pct(d.latencies, 0.5), "p99": _pct(d.latencies, 0.99), "faults": d.faults,
        "zero_faults": d.zero_faults, "requests": st.requests, "unplugged_requests": st.unplugged_requests,
        "write_p99": _pct(writes, 0.99), "total": st.total_time, "downtime": st.downtime,
        "needed": st.needed_bytes, "request_bytes": st.request_bytes, "kept": d.kept_bytes,
    }  # fmt: skip


def run(quick: bool = False) -> list[dict[str, Any]]:
    from ramdiscard.hostmem import uffd

    if uffd.available() is not None:
        return [{"group": "postcopy", "name": "postcopy", "skipped": uffd.available()}]
    region, plugged = (1 * GiB, 256 * MiB) if quick else (4 * GiB, 1 * GiB)
    runs = 1 if quick else 3
    ours: list[dict[str, Any]] = []
    single: list[dict[str, Any]] = []
    after: list[dict[str, Any]] = []
    errors: dict[str, str] = {}  # row -> the first failed run's error
    for _i in range(runs):
        for row, into, preempt, rounds in (
            ("preempt", ours, True, 0),
            ("preempt", single, False, 0),
            ("after", after, True, 1),
        ):
            try:
                into.append(one_run(region, plugged, preempt=preempt, rounds=rounds))
            except Exception as exc:  # the row fails with it; the other row still reports
                errors.setdefault(row, f"{type(exc).__name__}: {exc}")
    tag = f"{format_size(region)}-region-{format_size(plugged)}-plugged"
    first = f"postcopy-{tag}-fault-p99-preempt"
    second = f"postcopy-{tag}-after-one-precopy-round-fault-p99"
    return [
        {"group": "postcopy", "name": first, "failed": errors["preempt"]}
        if "preempt" in errors
        else _pure_row(first, ours, single),
        {"group": "postcopy", "name": second, "failed": errors["after"]}
        if "after" in errors
        else _after_row(second, plugged, after, ours),
    ]


def _pure_row(name: str, ours: list[dict[str, Any]], single: list[dict[str, Any]]) -> dict[str, Any]:
    p99s = [r["p99"] for r in ours]
    best = ours[p99s.index(statistics.median_low(p99s))]
    p99_single = statistics.median_low([r["p99"] for r in single])
    return {
        "group": "postcopy",
        "name": name,
        "ours_ns": int(best["p99"] * 1e9),
        "raw_ns": int(p99_single * 1e9),
        "target_ns_per_run": int(P99_TARGET * 1e9),
        "ns_per_run": int(best["p99"] * 1e9),
        "p99_ms_min_med_max": [
            round(min(p99s) * 1e3, 2),
            round(best["p99"] * 1e3, 2),
            round(max(p99s) * 1e3, 2),
        ],
        "p50_us": round(best["p50"] * 1e6, 1),
        "single_channel_p99_ms": [round(r["p99"] * 1e3, 2) for r in single],
        "faults": best["faults"],
        "zero_page_faults": best["zero_faults"],
        "unplugged_requests": max(r["unplugged_requests"] for r in ours + single),
        "dst_write_p99_ms": round(best["write_p99"] * 1e3, 2),
        "total_s": round(best["total"], 2),
        "downtime_ms": round(best["downtime"] * 1e3, 2),
        "baseline": "fault p99 without postcopy-preempt (one channel), same run",
    }


def _after_row(
    name: str, plugged: int, after: list[dict[str, Any]], pure: list[dict[str, Any]]
) -> dict[str, Any]:
    p99s = [r["p99"] for r in after]
    best = after[p99s.index(statistics.median_low(p99s))]
    return {
        "group": "postcopy",
        "name": name,
        "ours_ns": int(best["p99"] * 1e9),
        "target_ns_per_run": int(P99_TARGET * 1e9),
        "ns_per_run": int(best["p99"] * 1e9),
        "p99_ms_min_med_max": [
            round(min(p99s) * 1e3, 2),
            round(best["p99"] * 1e3, 2),
            round(max(p99s) * 1e3, 2),
        ],
        "faults_min_med_max": _mmm([r["faults"] for r in after]),
        "pure_postcopy_faults_min_med_max": _mmm([r["faults"] for r in pure]),
        "needed_MiB_min_med_max": _mmm([r["needed"] >> 20 for r in after]),
        "requested_MiB_min_med_max": _mmm([r["request_bytes"] >> 20 for r in after]),
        "plugged_MiB": plugged >> 20,
        "unplugged_requests": max(r["unplugged_requests"] for r in after),
        "downtime_ms": round(best["downtime"] * 1e3, 2),
        "total_s": round(best["total"], 2),
        "baseline": "faults of a pure postcopy (switched before any round), same run",
    }


def _mmm(xs: list[int]) -> list[int]:
    return [min(xs), statistics.median_low(xs), max(xs)]
