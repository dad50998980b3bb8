"""Live precopy benchmark rows of :mod:`ramdiscard.bench.migration` (described there)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ramdiscard.bench.migration_guest import WRITE_RATE, BenchGuest
from ramdiscard.units import MiB, format_size

DOWNTIME_TARGET = 0.020


def _dest_main(conn: Any, region: int) -> None:
    """The destination process: one request per message over ``conn`` (a Pipe end):
    ``"precopy"`` receives one live migration, ``"raw"`` one raw byte copy; each answers
    the listening port first, then its result."""
    from ramdiscard.migration.live_load import receive_live

    dst = BenchGuest(region, 2 * MiB)
    sink = bytearray(4 * MiB)
    try:
        while True:
            what = conn.recv()
            if what is None:
                return
            with socket.create_server(("127.0.0.1", 0)) as ls:
                conn.send(ls.getsockname()[1])
                try:
                    if what == "precopy":
                        cpu = time.process_time()  # CPU time: the wait for the source costs none
                        st = receive_live(ls, dst.space, [dst.dev], accept_timeout=60, read_timeout=60)
                        cpu = time.process_time() - cpu
                        dst.dev.unplug_all()
                        conn.send(("ok", (st.rounds, cpu)))
                    else:
                        c, _ = ls.accept()
                        cpu = time.process_time()
                        with c:
                            view, got = memoryview(sink), 0
                            while n := c.recv_into(view):
                                got += n
                            c.sendall(b"OK")
                        conn.send(("ok", (got, time.process_time() - cpu)))
                except Exception as exc:
                    conn.send(("error", repr(exc)))
    finally:
        dst.close()


class _Destination:
    def __init__(self, region: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_dest_main, args=(child, region), daemon=True)
        self.proc.start()
        child.close()

    def request(self, what: str) -> int:
        self.conn.send(what)
        if not self.conn.poll(120):
            raise RuntimeError("benchmark destination did not answer")
        return int(self.conn.recv())

    def result(self) -> Any:
        if not self.conn.poll(120):
            raise RuntimeError("benchmark destination did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"benchmark destination failed: {value}")
        return value

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()


class _Timed:
    """Wraps a region's scan to time it (the breakdown of a missed target)."""

    def __init__(self) -> None:
        self.scan = 0.0


def _precopy_once(src: BenchGuest, dest: _Destination) -> dict[str, Any]:
    import ramdiscard.migration.precopy as pc
    from ramdiscard.guest.writer import DeviceTarget, GuestWriter
    from ramdiscard.migration.tracking import TrackedRegion

    lock = threading.RLock()
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], lock, rate=WRITE_RATE, seed=7)
    timed = _Timed()
    orig_scan = TrackedRegion.scan

    def scan(region: Any) -> Any:
        t = time.perf_counter()
        try:
            return orig_scan(region)
        finally:
            timed.scan += time.perf_counter() - t

    writer.start()
    try:
        time.sleep(0.1)
        port = dest.request("precopy")
        TrackedRegion.scan = scan  # type: ignore[method-assign,assignment]
        cpu = time.thread_time()
        try:
            st = pc.precopy_to(
                "127.0.0.1", port, src.space, [src.dev], writer,
                pc.PrecopyParams(downtime_limit=DOWNTIME_TARGET), timeout=60, io_timeout=60,
            )  # fmt: skip
        finally:
            TrackedRegion.scan = orig_scan  # type: ignore[method-assign]
        cpu = time.thread_time() - cpu
        _rounds, dest_cpu = dest.result()
    finally:
        writer.resume()
        writer.stop()
    return {
        "total": st.total_time,
        "downtime": st.downtime,
        "stream_bytes": st.stream_bytes,
        "page_bytes": st.page_bytes,
        "rounds": st.rounds,
        "round_MiB": [round(b / MiB, 1) for b in st.round_bytes],
        "scan_s": timed.scan,
        "send_s": st.total_time - st.downtime - timed.scan - st.setup_time,
        "setup_s": st.setup_time,
        "cpu": cpu + dest_cpu,
    }


def _raw_stream(
    src: BenchGuest, dest: _Destination, nbytes: int, chunk: int = 1 * MiB
) -> tuple[float, float]:
    """``nbytes`` of the source's plugged memory, sendall to the destination process:
    (wall seconds, CPU seconds of the sending thread and the destination process)."""
    runs = list(src.dev.plugged_ranges())
    view = src.ram.view
    port = dest.request("raw")
    start, cpu = time.perf_counter(), time.thread_time()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        left = nbytes
        while left:
            for rstart, size in runs:
                for off in range(rstart, rstart + size, chunk):
                    n = min(chunk, rstart + size - off, left)
                    sock.sendall(view[off : off + n])
                    left -= n
                    if not left:
                        break
                if not left:
                    break
        sock.shutdown(socket.SHUT_WR)
        sock.recv(2)
    elapsed = time.perf_counter() - start
    cpu = time.thread_time() - cpu
    _got, dest_cpu = dest.result()
    return elapsed, cpu + dest_cpu


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2]


def start_destinations(regions: tuple[int, int]) -> list[_Destination]:
    """One destination process per region size; they start in the background."""
    dests: list[_Destination] = []
    try:
        for region in regions:
            dests.append(_Destination(region))
    except BaseException:
        for d in dests:
            d.close()
        raise
    return dests


def _precopy_runs(
    sources: tuple[BenchGuest, BenchGuest], dests: list[_Destination], reps: int
) -> tuple[list[dict[str, Any]], list[tuple[float, float]], list[dict[str, Any]]]:
    """Precopy runs of the small and the large region, interleaved (load from other work
    on the shared machine hits both alike), and a raw copy after each small one."""
    pairs = list(zip(sources, dests, strict=True))
    small, raws, large = [], [], []
    for _ in range(reps):
        r = _precopy_once(*pairs[0])
        small.append(r)
        raws.append(_raw_stream(pairs[0][0], pairs[0][1], r["stream_bytes"]))
        large.append(_precopy_once(*pairs[1]))
    return small, raws, large


def spread(xs: list[float]) -> list[float]:
    """min, median, max (rounded) of per-run ratios."""
    ys = sorted(xs)
    return [round(ys[0], 2), round(ys[len(ys) // 2], 2), round(ys[-1], 2)]


def _breakdown(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "rounds": r["rounds"],
        "round_MiB": r["round_MiB"],
        "scan_ms": round(r["scan_s"] * 1e3, 1),
        "send_ms": round(r["send_s"] * 1e3, 1),
        "setup_ms": round(r["setup_s"] * 1e3, 1),
        "freeze_to_handover_ms": round(r["downtime"] * 1e3, 2),
    }


def run_precopy(
    quick: bool, sources: tuple[BenchGuest, BenchGuest], dests: list[_Destination], plugged: int
) -> list[dict[str, Any]]:
    """The precopy rows: ``sources`` (small and large region, ``plugged`` bytes plugged and
    filled) migrate to ``dests`` (:func:`start_destinations` of the same sizes)."""
    small, large = (s.dev.region_size for s in sources)
    reps = 1 if quick else 3  # three: the downtime row reports a true median
    runs, raws, big = _precopy_runs(sources, dests, reps)
    med = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    down = _median([r["downtime"] for r in runs])
    total, raw = min(r["total"] for r in runs), min(w for w, _c in raws)
    cpu, raw_cpu = min(r["cpu"] for r in runs), min(c for _w, c in raws)
    sent = _median([float(r["stream_bytes"]) for r in runs])
    tag = f"{format_size(small)}-region-{format_size(plugged)}-plugged"
    common = {"write_MiB_s": WRITE_RATE // MiB, "runs": reps}
    rows: list[dict[str, Any]] = []
    row: dict[str, Any] = {
        "group": "migration",
        "name": f"precopy-{tag}-downtime",
        "ours_ns": int(down * 1e9),
        "target_ns_per_run": int(DOWNTIME_TARGET * 1e9),
        "ns_per_run": int(down * 1e9),
        "downtimes_ms": [round(r["downtime"] * 1e3, 2) for r in runs],
        **common,
    }
    if down > DOWNTIME_TARGET:
        row.update(_breakdown(med))
    rows.append(row)
    row = {
        "group": "migration",
        "name": f"precopy-{tag}-total",
        "ours_ns": int(total * 1e9),
        "raw_ns": int(raw * 1e9),
        "ratio": total / raw,
        "target": 2.0,
        "ratio_per_run": spread([r["total"] / w for r, (w, _c) in zip(runs, raws, strict=True)]),
        "cpu_ratio": round(cpu / raw_cpu, 2),
        "ours_cpu_ms": round(cpu * 1e3),
        "raw_cpu_ms": round(raw_cpu * 1e3),
        "stream_MiB": round(sent / MiB, 1),
        "baseline": "raw sendall/recv_into of the bytes precopy sent to a separate process (reused buffer)",
        **common,
    }
    if total / raw > 2.0:
        row.update(_breakdown(med))
    rows.append(row)
    rows.append(
        {
            "group": "migration",
            "name": f"precopy-{tag}-bytes",
            "ratio": sent / plugged,
            "target": 1.2,
            "stream_MiB": round(sent / MiB, 1),
            "plugged_MiB": plugged // MiB,
            "baseline": "plugged bytes",
            **({} if sent / plugged <= 1.2 else _breakdown(med)),
        }
    )
    total_big = min(r["total"] for r in big)
    row = {
        "group": "migration",
        "name": f"precopy-{format_size(large)}-region-{format_size(plugged)}-plugged",
        "ours_ns": int(total_big * 1e9),
        "raw_ns": int(total * 1e9),
        "ratio": total_big / total,
        "target": 1.1,
        "ratio_per_run": spread([b["total"] / r["total"] for b, r in zip(big, runs, strict=True)]),
        "downtime_ms": round(_median([r["downtime"] for r in big]) * 1e3, 2),
        "baseline": f"precopy of the {format_size(small)} region, same plugged size and writer",
        **common,
    }
    if total_big / total > 1.1:
        row.update(_breakdown(sorted(big, key=lambda r: r["total"])[len(big) // 2]))
    rows.append(row)
    return rows
