"""Benchmark: replay of populated runs over large bitmaps.

For each pattern (all set, all clear, 8 long runs, alternating, random 50 %) and size
(2^19 blocks = 1 TiB at 2 MiB, 2^28 blocks = 1 TiB at 4 KiB) it times a full
``replay_populated`` through :class:`BlockStateManager` (one section object and one
callback per run) and, as the raw baseline measured in the same run, the plain numpy way
of finding the same runs (unpack to bytes, diff, flatnonzero) without any callback.
Dense patterns on 2^28 blocks have ~10^8 runs; there the replay is timed over a window of
2^22 blocks and reported per run and per block of that window.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.rdm.block_state import BlockStateManager

_GRAN = 4096


class _NoRam:
    def __init__(self, size: int) -> None:
        self.size = size
        self.host_address = 0
        self.page_size = 4096


def _fill(m: BlockStateManager, pattern: str, nbits: int) -> None:
    words = m._bitmap._words
    if pattern == "all set":
        m._bitmap.set_range(0, nbits)
    elif pattern == "8 long runs":
        step = nbits // 16
        for i in range(8):
            m._bitmap.set_range(2 * i * step + step // 2, 2 * i * step + step)
    elif pattern == "alternating":
        words[:] = np.uint64(0x5555555555555555)
    elif pattern == "random 50%":
        rng = np.random.default_rng(42)
        words[:] = rng.integers(0, 1 << 63, size=len(words), dtype=np.uint64) * np.uint64(2) + rng.integers(
            0, 2, size=len(words), dtype=np.uint64
        )
    m._bitmap._count = int(np.bitwise_count(words).sum())


def _baseline_runs(words: np.ndarray, start: int, end: int) -> int:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[start:end].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], bits, [0]))))
    return len(edges) // 2


def _time(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(quick: bool = False) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    sizes = [1 << 19] if quick else [1 << 19, 1 << 28]
    for nbits in sizes:
        mr = MemoryRegion.new_ram("bench", _NoRam(nbits * _GRAN))
        for pattern in ("all set", "all clear", "8 long runs", "alternating", "random 50%"):
            m = BlockStateManager(mr, _GRAN)
            _fill(m, pattern, nbits)
            dense = pattern in ("alternating", "random 50%")
            window = min(nbits, 1 << 22) if (dense and nbits > 1 << 22) else nbits
            section = MemoryRegionSection(mr, 0, window * _GRAN)
            count = 0

            def cb(_: MemoryRegionSection) -> None:
                nonlocal count
                count += 1

            def replay(section: MemoryRegionSection = section, m: BlockStateManager = m) -> None:
                nonlocal count
                count = 0
                m.replay_populated(section, cb)

            repeat = 1 if window >= 1 << 22 and dense else 3
            ours = _time(replay, repeat)
            runs = count
            words = m._bitmap._words

            def raw_fn(words: np.ndarray = words, window: int = window) -> int:
                return _baseline_runs(words, 0, window)

            raw = _time(raw_fn, 1 if window > 1 << 22 else 3)
            assert _baseline_runs(words, 0, window) == runs
            rows.append(
                {
                    "group": "rdm replay",
                    "name": f"{pattern}, 2^{nbits.bit_length() - 1} blocks"
                    + (f" (window 2^{window.bit_length() - 1})" if window != nbits else ""),
                    "ours_ns": ours * 1e9,
                    "raw_ns": raw * 1e9,
                    "ratio": ours / raw,
                    "ns_per_block": ours * 1e9 / window,
                    "ns_per_run": ours * 1e9 / runs if runs else None,
                    "runs": runs,
                }
            )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
