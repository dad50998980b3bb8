"""Benchmark: replay of populated runs and ``is_populated`` over large bitmaps, against
the C floor.

For each pattern (all set, all clear, 8 long runs, alternating, random 50 %) and size
(2^19 blocks = 1 TiB at 2 MiB, 2^28 blocks = 1 TiB at 4 KiB) it times a full
``replay_populated`` through :class:`BlockStateManager` (one section object and one
callback per run), and ``is_populated`` of the whole all-set region (the case where C's
find_next_zero_bit must walk every word; on the other patterns it stops at the first
clear bit within nanoseconds).
The baseline is the C floor measured in the same run (``bitfloor.c`` via
:mod:`ramdiscard.bench.cfloor`): a find_next_bit / find_next_zero_bit iterator calling a
function per run over the same words (or one find_next_zero_bit for ``is_populated``).
C is the fair baseline here: there is no raw Python way of doing this that is not slower
than ours. Each C run is checked to find the same runs and bits as ours.

Targets: sparse maps at most 3x C at 2^19 blocks and at most 1x C at 2^28 blocks (C walks
every word; ours skips uniform groups); dense maps at most 1.5 µs per run. Dense patterns
have ~nbits/2 runs; both sides replay a window of at most 2^19 blocks (2^16 in quick
mode; the per-run cost does not depend on the window; 2^27 runs would take minutes).
The 8 runs start off any word boundary (like the C reference pattern), so they are not
aligned to the bitmap's summary groups.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ramdiscard.bench.cfloor import NoFloor, bitscan_floor
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.rdm.block_state import BlockStateManager

_GRAN = 4096
PATTERNS = ("all set", "all clear", "8 long runs", "alternating", "random 50%")
SPARSE_TARGET = {19: 3.0, 28: 1.0}
DENSE_TARGET_NS_PER_RUN = 1500


class _NoRam:
    def __init__(self, size: int) -> None:
        self.size = size
        self.host_address = 0
        self.page_size = 4096


def fill(m: BlockStateManager, pattern: str) -> None:
    """Put ``pattern`` into the manager's bitmap through its range operations (sparse
    patterns) or its bytes (dense ones)."""
    bm = m._bitmap
    nbits = bm.nbits
    if pattern == "all set":
        bm.set_range(0, nbits)
    elif pattern == "8 long runs":
        for k in range(8):
            s = k * (nbits // 8) + nbits // 64 + 3
            bm.set_range(s, s + nbits // 16)
    elif pattern in ("alternating", "random 50%"):
        nwords = (nbits + 63) // 64
        if pattern == "alternating":
            words = np.full(nwords, 0x5555555555555555, dtype="<u8")
        else:
            rng = np.random.default_rng(42)
            words = rng.integers(0, 1 << 64, size=nwords, dtype=np.uint64, endpoint=False).astype("<u8")
        m._bitmap = type(bm).from_bytes(nbits, words.tobytes())
    elif pattern != "all clear":
        raise ValueError(f"unknown pattern {pattern!r}")


def _time(fn: Callable[[], object], min_s: float, max_reps: int = 1000) -> float:
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < 3 or (spent < min_s and reps < max_reps):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        best = min(best, dt)
        spent += dt
        reps += 1
    return best


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    sizes = [19] if quick else [19, 28]
    min_s = 0.02 if quick else 0.1
    dense_window = 1 << 16 if quick else 1 << 19
    missing: str | None = None
    for shift in sizes:
        nbits = 1 << shift
        mr = MemoryRegion.new_ram("bench", _NoRam(nbits * _GRAN))
        for pattern in PATTERNS:
            m = BlockStateManager(mr, _GRAN)
            fill(m, pattern)
            dense = pattern in ("alternating", "random 50%")
            window = min(nbits, dense_window) if dense else nbits
            section = MemoryRegionSection(mr, 0, window * _GRAN)
            tally = [0, 0]

            def cb(s: MemoryRegionSection, tally: list[int] = tally) -> None:
                tally[0] += 1
                tally[1] += s.size

            def replay(
                section: MemoryRegionSection = section, m: BlockStateManager = m, tally: list[int] = tally
            ) -> None:
                tally[0] = tally[1] = 0
                m.replay_populated(section, cb)

            ours = _time(replay, min_s, 3 if dense else 1000)
            runs, bits = tally[0], tally[1] // _GRAN
            words = m._bitmap.to_bytes()
            c: dict[str, int] | None = None
            try:
                c = bitscan_floor(words, nbits, 0, window, min_s * 1e3)
                if (c["runs"], c["bits"]) != (runs, bits):
                    raise RuntimeError(
                        f"C floor found {c['runs']} runs / {c['bits']} bits, ours {runs} / {bits}"
                    )
            except NoFloor as exc:
                missing = str(exc)
            name = f"replay {pattern}, 2^{shift} blocks"
            if window != nbits:
                name += f" (window 2^{window.bit_length() - 1})"
            row: dict[str, Any] = {
                "group": "rdm replay",
                "name": name,
                "ours_ns": ours * 1e9,
                "c_ns": None if c is None else c["best_ns"],
                "vs": "C",
                "ratio": None if c is None else ours * 1e9 / c["best_ns"],
                "ns_per_run": ours * 1e9 / runs if runs else None,
                "runs": runs,
            }
            if dense:
                row["target_ns_per_run"] = DENSE_TARGET_NS_PER_RUN
            else:
                row["target"] = SPARSE_TARGET[shift]
            rows.append(row)
            if pattern != "all set":
                continue
            whole = MemoryRegionSection(mr, 0, mr.size)
            answer = m.is_populated(whole)
            ours = _time(lambda: m.is_populated(whole), min_s)  # noqa: B023  (called right here)
            c = None
            try:
                c = bitscan_floor(words, nbits, 0, nbits, min_s * 1e3, mode="allset")
                if bool(c["runs"]) != answer:
                    raise RuntimeError(f"C floor says all set = {bool(c['runs'])}, ours {answer}")
            except NoFloor as exc:
                missing = str(exc)
            rows.append(
                {
                    "group": "rdm replay",
                    "name": f"is_populated(whole region) {pattern}, 2^{shift} blocks",
                    "ours_ns": ours * 1e9,
                    "c_ns": None if c is None else c["best_ns"],
                    "vs": "C",
                    "ratio": None if c is None else ours * 1e9 / c["best_ns"],
                    "target": SPARSE_TARGET[shift],
                }
            )
    if missing is not None:
        rows.append({"group": "rdm replay", "name": "C floor (bitfloor.c)", "notes": missing})
    return rows


if __name__ == "__main__":
    for row in run():
        print(
            f"{row['name']:<52} ours {row.get('ours_ns', 0) / 1e3:10.1f} us  C "
            f"{(row.get('c_ns') or 0) / 1e3:10.1f} us  ratio {row.get('ratio') or 0:7.2f}  "
            f"per run {row.get('ns_per_run') or 0:8.0f} ns"
        )
