"""Migration benchmarks: loopback TCP migration against a raw socket copy, and scaling
with plugged size rather than region size.

Rows (``ours_ns`` / ``raw_ns`` measured in the same run):

* ``tcp-4G-region-1G-plugged``: migrate a 4 GiB virtio-mem region with 1 GiB plugged
  (fragmented) over loopback TCP (every section length-prefixed and checksummed, checked
  on the destination), against a raw ``sendall``/``recv_into`` copy of the same 1 GiB
  between the same two RAM blocks, with no framing and no checksum. The raw copy uses
  its own best chunk size: each of :data:`RAW_CHUNKS` is timed three times first and
  the fastest kept (``raw_chunk`` in the row). Target 1.3.
* ``tcp-1T-region-1G-plugged``: the same 1 GiB plugged in a 1 TiB region (sparse
  anonymous memory), against the 4 GiB-region migration. Target 1.2: time follows the
  plugged size, not the region size.

* ``precopy-4G-region-1G-plugged-*``: live precopy of the same layout while the guest
  writer writes 50 MiB/s of random 4 KiB pages, destination in a separate process (its
  own GIL), over loopback. Three rows from one set of runs: ``downtime`` (median of the
  runs; absolute target 20 ms), ``total`` (best of the runs, as the baseline) against a raw ``sendall`` /
  ``recv_into`` copy of the stream bytes the precopy actually sent, to the same kind of
  separate process, into one reused 4 MiB buffer (no page faults: stricter than guest
  memory, which the migration populates) (target 2.0), ``bytes`` transferred against plugged (target 1.2).
  A missed target carries the breakdown: rounds, bytes per round, scan time, send time,
  freeze-to-handover.
* ``precopy-1T-region-1G-plugged``: the same in a 1 TiB region, total time (best of
  the runs, interleaved with the 4 GiB ones) against the 4 GiB case (target 1.1).

* ``snapshot-4G-region-1G-plugged-write-p99``: background snapshot to a file while the
  writer writes 50 MiB/s of random pages: p99 of single page-write latency during the
  snapshot (absolute target 5 ms), the same writer's p99 without a snapshot as the
  baseline; ``snapshot-...-file``: the file's allocated size (``st_blocks``) against
  plugged + metadata rounded up to 4 KiB (target 1.001: what remains is the
  filesystem's own extent blocks, ``fs_extra_bytes``).

``quick``: 256 MiB plugged (precopy: 64 MiB), 1 GiB and 256 GiB regions, the raw chunk
sweep once over three sizes, one precopy run per size (full: two; the migration group
then takes about three minutes on the shared 2-vCPU machine, most of it kernel time
populating and discarding memory).

Where the time goes (2 vCPUs, best of 8, one process; the same within 3% with the
destination in a second process): the raw copy at 1 MiB keeps both vCPUs ~95% busy
(sender 158 ms + receiver 148 ms of CPU in 160 ms). The migration without any checksum
takes 193-206 ms (framing, per-section Python, 4 MiB sections); checksumming either side
alone or both takes 234-249 ms: XXH3 over 1 GiB costs 46 ms on the source (guest memory
is cold, 23 GB/s with AVX-512) and ~30 ms on the destination (hashed right after each
read, in cache) and there is no idle CPU to hide it in. Hashing in L2-sized pieces
gains ~1 ms/GiB over 4 MiB pieces here (a 32 MiB L3 already holds a section); a bounce
buffer on the destination costs 50-85 ms/GiB more (the extra memmove).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from ramdiscard.units import GiB, KiB, MiB, TiB, format_size

CHUNK = 4 * MiB
"""Chunk size of our migration (its default)."""
RAW_CHUNKS = (256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB, 8 * MiB)
"""Chunk sizes tried for the raw copy; it runs with the fastest."""


class _Guest:
    def __init__(self, size: int, block: int) -> None:
        from ramdiscard.hostmem import RamBlock
        from ramdiscard.memory import AddressSpace, MemoryRegion
        from ramdiscard.providers.virtio_mem import VirtioMem
        from ramdiscard.rdm import DiscardPolicy

        self.ram = RamBlock(size, "anonymous", name="bench-vmem")
        self.mr = MemoryRegion.new_ram("bench-vmem", self.ram)
        self.dev = VirtioMem(
            self.mr, id="vmem0", addr=4 * GiB, block_size=block, requested_size=size, policy=DiscardPolicy()
        )
        self.root = MemoryRegion.new_container("system", 4 * GiB + size)
        self.root.add_subregion(4 * GiB, self.dev.device_region)
        self.space = AddressSpace("system", self.root)
        self.block = block

    def plug_spread(self, plugged: int, run_blocks: int = 8) -> None:
        """Plug runs of ``run_blocks`` blocks spread evenly over the whole region."""
        nruns = plugged // (run_blocks * self.block)
        stride = self.dev.region_size // nruns
        for i in range(nruns):
            assert self.dev.plug(self.dev.addr + i * stride, run_blocks).name == "ACK"

    def fill(self) -> None:
        for start, size in self.dev.plugged_ranges():
            view = self.ram.view[start : start + size]
            for off in range(0, size, 4096):
                view[off : off + 8] = (start + off).to_bytes(8, "little")

    def close(self) -> None:
        for sub in self.root.subregions:
            self.root.del_subregion(sub)
        self.space.destroy()
        self.dev.unrealize()
        self.ram.close()


def _migrate(src: _Guest, dst: _Guest) -> float:
    from ramdiscard.migration.tcp import migrate_to, receive_from

    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                receive_from(ls, dst.space, [dst.dev], accept_timeout=60)
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=receive)
        t.start()
        start = time.perf_counter()
        migrate_to("127.0.0.1", port, src.space, [src.dev], chunk_size=CHUNK)
        t.join()
        elapsed = time.perf_counter() - start
    if errors:
        raise errors[0]
    dst.dev.unplug_all()
    return elapsed


def _raw_copy(src: _Guest, dst: _Guest, chunk: int = CHUNK) -> float:
    """The same bytes between the same mappings: sendall / recv_into in ``chunk`` pieces."""
    runs = list(src.dev.plugged_ranges())
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            conn, _ = ls.accept()
            with conn:
                view = dst.ram.view
                for start, size in runs:
                    for off in range(start, start + size, chunk):
                        n = min(chunk, start + size - off)
                        pos = 0
                        while pos < n:
                            got = conn.recv_into(view[off + pos : off + n], n - pos)
                            if not got:
                                return
                            pos += got
                conn.sendall(b"OK")

        t = threading.Thread(target=receive)
        t.start()
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            view = src.ram.view
            for rstart, size in runs:
                for off in range(rstart, rstart + size, chunk):
                    sock.sendall(view[off : min(off + chunk, rstart + size)])
            sock.shutdown(socket.SHUT_WR)
            sock.recv(2)
        t.join()
        elapsed = time.perf_counter() - start
    dst.ram.discard_range(0, dst.ram.size)
    return elapsed


def _pair(region: int, plugged: int) -> tuple[_Guest, _Guest]:
    src = _Guest(region, 2 * MiB)
    src.plug_spread(plugged)
    src.fill()
    return src, _Guest(region, 2 * MiB)


def run(quick: bool = False) -> list[dict[str, Any]]:
    plugged = 256 * MiB if quick else 1 * GiB
    small = 1 * GiB if quick else 4 * GiB
    large = 256 * GiB if quick else 1 * TiB
    reps = 3 if quick else 7
    rows: list[dict[str, Any]] = []
    src, dst = _pair(small, plugged)
    try:
        _raw_copy(src, dst)  # warm up: fault in the destination's page tables once
        # Rounds over all sizes (not size after size), so a burst of load from other
        # work on the machine cannot disqualify one size.
        chunks = RAW_CHUNKS[2::2] if quick else RAW_CHUNKS
        sweep = {c: float("inf") for c in chunks}
        for _ in range(1 if quick else 3):
            for c in chunks:
                sweep[c] = min(sweep[c], _raw_copy(src, dst, c))
        raw_chunk = min(sweep, key=lambda c: sweep[c])
        # Interleaved, best of ``reps``: the machine is shared, so load comes and goes.
        raws, ours = [], []
        for _ in range(reps):
            raws.append(_raw_copy(src, dst, raw_chunk))
            ours.append(_migrate(src, dst))
        raw, ours_small = min(raws), min(ours)
    finally:
        src.close()
        dst.close()
    rows.append(
        {
            "group": "migration",
            "name": f"tcp-{format_size(small)}-region-{format_size(plugged)}-plugged",
            "ours_ns": int(ours_small * 1e9),
            "raw_ns": int(raw * 1e9),
            "ratio": ours_small / raw,
            "target": 1.3,
            "ours_MiB_s": plugged / MiB / ours_small,
            "raw_MiB_s": plugged / MiB / raw,
            "raw_chunk": raw_chunk,
            "raw_sweep_ns": {format_size(c): int(t * 1e9) for c, t in sweep.items()},
            "baseline": "raw sendall/recv_into of the same bytes, at its best chunk size",
        }
    )
    src, dst = _pair(large, plugged)
    try:
        ours_large = min(_migrate(src, dst) for _ in range(reps))
    finally:
        src.close()
        dst.close()
    rows.append(
        {
            "group": "migration",
            "name": f"tcp-{format_size(large)}-region-{format_size(plugged)}-plugged",
            "ours_ns": int(ours_large * 1e9),
            "raw_ns": int(ours_small * 1e9),
            "ratio": ours_large / ours_small,
            "target": 1.2,
            "ours_MiB_s": plugged / MiB / ours_large,
            "baseline": f"migration of the {format_size(small)} region with the same plugged size",
        }
    )
    rows.extend(run_precopy(quick))
    rows.extend(run_snapshot(quick))
    return rows


# -- live precopy ---------------------------------------------------------------------------

WRITE_RATE = 50 * MiB
DOWNTIME_TARGET = 0.020


def _dest_main(conn: Any, region: int) -> None:
    """The destination process: one request per message over ``conn`` (a Pipe end):
    ``"precopy"`` receives one live migration, ``"raw"`` one raw byte copy; each answers
    the listening port first, then its result."""
    from ramdiscard.migration.live_load import receive_live

    dst = _Guest(region, 2 * MiB)
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
                        st = receive_live(ls, dst.space, [dst.dev], accept_timeout=60, read_timeout=60)
                        dst.dev.unplug_all()
                        conn.send(("ok", st.rounds))
                    else:
                        c, _ = ls.accept()
                        with c:
                            view, got = memoryview(sink), 0
                            while n := c.recv_into(view):
                                got += n
                            c.sendall(b"OK")
                        conn.send(("ok", got))
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


def _precopy_once(src: _Guest, dest: _Destination) -> dict[str, Any]:
    import ramdiscard.migration.precopy as pc
    from ramdiscard.guest.writer import DeviceTarget, GuestWriter

    lock = threading.RLock()
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], lock, rate=WRITE_RATE, seed=7)
    timed = _Timed()
    orig_scan = pc._Region.scan

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
        pc._Region.scan = scan  # type: ignore[method-assign,assignment]
        try:
            st = pc.precopy_to(
                "127.0.0.1", port, src.space, [src.dev], writer,
                pc.PrecopyParams(downtime_limit=DOWNTIME_TARGET), timeout=60, io_timeout=60,
            )  # fmt: skip
        finally:
            pc._Region.scan = orig_scan  # type: ignore[method-assign]
        dest.result()
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
    }


def _raw_stream(src: _Guest, dest: _Destination, nbytes: int, chunk: int = 1 * MiB) -> float:
    """``nbytes`` of the source's plugged memory, sendall to the destination process."""
    runs = list(src.dev.plugged_ranges())
    view = src.ram.view
    port = dest.request("raw")
    start = time.perf_counter()
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
    dest.result()
    return elapsed


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[len(ys) // 2]


def _precopy_runs(
    regions: tuple[int, int], plugged: int, reps: int
) -> tuple[list[dict[str, Any]], list[float], list[dict[str, Any]]]:
    """Precopy runs of the small and the large region, interleaved (load from other work
    on the shared machine hits both alike), and a raw copy after each small one. One
    untimed run of each first: the destination's first populate can stall for seconds in
    the kernel's direct compaction of huge pages (thp defrag ``madvise``), once."""
    pairs = []
    try:
        for region in regions:
            src = _Guest(region, 2 * MiB)
            pairs.append((src, _Destination(region)))
            src.plug_spread(plugged)
            src.fill()
        for src, dest in pairs:  # untimed: the first huge pages may need compaction
            _precopy_once(src, dest)
        small, raws, large = [], [], []
        for _ in range(reps):
            r = _precopy_once(*pairs[0])
            small.append(r)
            raws.append(_raw_stream(pairs[0][0], pairs[0][1], r["stream_bytes"]))
            large.append(_precopy_once(*pairs[1]))
    finally:
        for src, dest in pairs:
            dest.close()
            src.close()
    return small, raws, large


def _breakdown(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "rounds": r["rounds"],
        "round_MiB": r["round_MiB"],
        "scan_ms": round(r["scan_s"] * 1e3, 1),
        "send_ms": round(r["send_s"] * 1e3, 1),
        "setup_ms": round(r["setup_s"] * 1e3, 1),
        "freeze_to_handover_ms": round(r["downtime"] * 1e3, 2),
    }


def run_precopy(quick: bool = False) -> list[dict[str, Any]]:
    plugged = 64 * MiB if quick else 1 * GiB
    small = 1 * GiB if quick else 4 * GiB
    large = 256 * GiB if quick else 1 * TiB
    reps = 1 if quick else 2
    runs, raws, big = _precopy_runs((small, large), plugged, reps)
    med = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
    down = _median([r["downtime"] for r in runs])
    total, raw = min(r["total"] for r in runs), min(raws)
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
        "downtime_ms": round(_median([r["downtime"] for r in big]) * 1e3, 2),
        "baseline": f"precopy of the {format_size(small)} region, same plugged size and writer",
        **common,
    }
    if total_big / total > 1.1:
        row.update(_breakdown(sorted(big, key=lambda r: r["total"])[len(big) // 2]))
    rows.append(row)
    return rows


SNAPSHOT_P99_TARGET = 0.005


def _p99(xs: list[float]) -> float:
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(len(ys) * 0.99))] if ys else 0.0


def run_snapshot(quick: bool = False) -> list[dict[str, Any]]:
    import os
    import tempfile

    from ramdiscard.guest.writer import DeviceTarget, GuestWriter
    from ramdiscard.migration.snapshot import background_snapshot

    plugged = 256 * MiB if quick else 1 * GiB
    region = 1 * GiB if quick else 4 * GiB
    src = _Guest(region, 2 * MiB)
    writer = GuestWriter([DeviceTarget(src.dev, src.ram)], threading.RLock(), rate=WRITE_RATE, seed=9)
    fd, path = tempfile.mkstemp(prefix="rd-bench-snap-", dir="/var/tmp")
    try:
        src.plug_spread(plugged)
        src.fill()
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
        src.close()
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


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
