"""Populate/discard throughput of RamBlock against the raw syscalls, measured side by side.

Method:

* For each backing (anonymous with THP, anonymous on 4 KiB pages, memfd, and hugetlb memfd
  when the pool has enough free pages) and each chunk size (128 MiB, 2 MiB, 4 KiB), a fresh
  RamBlock and a fresh *raw* mapping of the same kind are created. The raw side issues the
  same syscalls directly: ``mmap.madvise`` for populate and anonymous discard, the ctypes
  ``fallocate(PUNCH_HOLE | KEEP_SIZE)`` for memfd discard.
* One repetition populates the whole region chunk by chunk, then discards it chunk by
  chunk, and is timed per pass. Repetitions alternate between ours and raw, and which of
  the two goes first, so drift on the shared machine hits both. Each reported figure is
  the best of N passes.
* Every populate follows a discard of the same memory within milliseconds: these are the
  *hot* numbers of ``host-limits.md``. Cold memory (reclaimed by the host seconds after a
  discard) is several times slower for both sides and is not measured here.
* A row's ``ratio`` is ours/raw per call; the project target is at most 1.1 for chunks of
  2 MiB and larger. At 4 KiB the fixed Python cost of a method call with validation is
  visible (the syscall itself takes only 2-5 us).

The benchmark never changes system settings; to include hugetlb rows, make at least
``2 * 128 MiB`` of huge pages free first (e.g. ``echo 160 > /proc/sys/vm/nr_hugepages``).
"""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ramdiscard.hostmem import syscalls
from ramdiscard.hostmem.measure import hugepage_pool
from ramdiscard.hostmem.ramblock import RamBlock
from ramdiscard.units import KiB, MiB, format_size

CHUNKS = (128 * MiB, 2 * MiB, 4 * KiB)
TARGET = 1.1
"""The project's target ratio, for chunks of at least ``TARGET_MIN_CHUNK``."""
TARGET_MIN_CHUNK = 2 * MiB


@dataclass(frozen=True)
class _Config:
    name: str
    backing: str
    thp: bool = True
    hugetlb: bool = False


_CONFIGS = (
    _Config("anon_thp", "anonymous", thp=True),
    _Config("anon_4k", "anonymous", thp=False),
    _Config("memfd", "memfd"),
    _Config("memfd_hugetlb", "memfd", hugetlb=True),
)

Op = Callable[[int, int], None]


@dataclass
class _Raw:
    """A mapping like the block's, driven by the bare syscalls."""

    mm: mmap.mmap
    fd: int | None
    populate: Op
    discard: Op

    def close(self) -> None:
        self.mm.close()
        if self.fd is not None:
            os.close(self.fd)


def _raw_mapping(cfg: _Config, size: int) -> _Raw:
    if cfg.backing == "anonymous":
        mm = mmap.mmap(-1, size, flags=syscalls.MAP_PRIVATE | syscalls.MAP_NORESERVE)
        mm.madvise(syscalls.MADV_HUGEPAGE if cfg.thp else syscalls.MADV_NOHUGEPAGE, 0, size)
        madvise = mm.madvise

        def populate(off: int, length: int) -> None:
            madvise(syscalls.MADV_POPULATE_WRITE, off, length)

        def discard(off: int, length: int) -> None:
            madvise(syscalls.MADV_DONTNEED, off, length)

        return _Raw(mm, None, populate, discard)

    fd = os.memfd_create("raw", os.MFD_CLOEXEC | (os.MFD_HUGETLB if cfg.hugetlb else 0))
    os.ftruncate(fd, size)
    mm = mmap.mmap(fd, size, flags=syscalls.MAP_SHARED | syscalls.MAP_NORESERVE)
    madvise = mm.madvise
    fallocate = syscalls._fallocate
    mode = syscalls.FALLOC_FL_PUNCH_HOLE | syscalls.FALLOC_FL_KEEP_SIZE

    def populate_fd(off: int, length: int) -> None:
        madvise(syscalls.MADV_POPULATE_WRITE, off, length)

    def punch(off: int, length: int) -> None:
        if fallocate(fd, mode, off, length) != 0:
            raise OSError("fallocate failed")

    return _Raw(mm, fd, populate_fd, punch)


def _pass(op: Op, chunk: int, calls: int) -> int:
    """Time ``calls`` calls of ``op`` over consecutive chunks; ns per call."""
    offsets = range(0, chunk * calls, chunk)
    start = time.perf_counter_ns()
    for off in offsets:
        op(off, chunk)
    return (time.perf_counter_ns() - start) // calls


@contextmanager
def _pair(cfg: _Config, size: int) -> Iterator[tuple[RamBlock, _Raw]]:
    block = RamBlock(size, cfg.backing, hugepages=cfg.hugetlb, thp=cfg.thp, name="bench")
    try:
        raw = _raw_mapping(cfg, size)
        try:
            yield block, raw
        finally:
            raw.close()
    finally:
        block.close()


def _measure(cfg: _Config, chunk: int, region: int, reps: int) -> list[dict[str, object]]:
    calls = region // chunk
    best = {key: float("inf") for key in ("ours_pop", "raw_pop", "ours_dis", "raw_dis")}
    with _pair(cfg, region) as (block, raw):
        sides = {"ours": (block.populate, block.discard_range), "raw": (raw.populate, raw.discard)}
        for side in sides.values():  # warm-up: fault the page tables in, leave it discarded
            _pass(side[0], chunk, calls)
            _pass(side[1], chunk, calls)
        for rep in range(reps):
            order = ("ours", "raw") if rep % 2 == 0 else ("raw", "ours")
            for name in order:
                populate, discard = sides[name]
                best[f"{name}_pop"] = min(best[f"{name}_pop"], _pass(populate, chunk, calls))
                best[f"{name}_dis"] = min(best[f"{name}_dis"], _pass(discard, chunk, calls))
    rows: list[dict[str, object]] = []
    for op, key in (("populate", "pop"), ("discard", "dis")):
        ours, raw_ns = best[f"ours_{key}"], best[f"raw_{key}"]
        rows.append(
            {
                "group": "hostmem",
                "name": op,
                "backing": cfg.name,
                "chunk": chunk,
                "ours_ns": int(ours),
                "raw_ns": int(raw_ns),
                "ratio": round(ours / raw_ns, 3),
                "gib_s": round(chunk / ours * 1e9 / (1 << 30), 2),
                "target": TARGET if chunk >= TARGET_MIN_CHUNK else None,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict[str, object]]:
    """Measure populate and discard per backing and chunk size, ours next to raw.

    Returns one dict per (operation, backing, chunk) with keys ``group`` ("hostmem"),
    ``name`` (``"populate"`` or ``"discard"``), ``backing``, ``chunk`` (bytes), ``ours_ns``
    and ``raw_ns`` (best time per call), ``ratio`` (ours/raw), ``gib_s`` (our throughput)
    and ``target`` (:data:`TARGET` from 2 MiB chunks up, else None). ``quick`` uses
    fewer repetitions and smaller regions for small chunks (a few seconds in all).
    Peak use is about 2 x 128 MiB of memory.
    """
    reps = 3 if quick else 7
    rows: list[dict[str, object]] = []
    pool = hugepage_pool()
    for cfg in _CONFIGS:
        for chunk in CHUNKS:
            if cfg.hugetlb:
                if chunk < pool.page_size:
                    continue
                if pool.free * pool.page_size < 2 * max(chunk, 16 * MiB):
                    continue
            if chunk >= 2 * MiB:
                region = max(chunk, (32 if quick else 128) * MiB)
            else:
                region = (8 if quick else 32) * MiB
            rows.extend(_measure(cfg, chunk, region, reps))
    return rows


def format_table(rows: list[dict[str, object]]) -> str:
    lines = [f"{'op':<9}{'backing':<15}{'chunk':>9}{'ours ns':>13}{'raw ns':>13}{'ratio':>8}{'GiB/s':>9}"]
    for r in rows:
        chunk = r["chunk"]
        assert isinstance(chunk, int)
        lines.append(
            f"{r['name']!s:<9}{r['backing']!s:<15}{format_size(chunk):>9}{r['ours_ns']!s:>13}"
            f"{r['raw_ns']!s:>13}{r['ratio']!s:>8}{r['gib_s']!s:>9}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(format_table(run(quick="--quick" in sys.argv)))
