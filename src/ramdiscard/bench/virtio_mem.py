"""Benchmarks showing that request cost does not grow with the region size.

Rules: ``run(quick=False)`` returns one dict per measurement (``name``, sizes, seconds per
operation, and for the comparison the ``ratio`` with its ``target``). Huge regions use a
sparse anonymous RamBlock (``MAP_NORESERVE``: address space only, nothing is populated)
when :mod:`ramdiscard.hostmem` is available, otherwise a null RAM block that only accepts
calls. Nothing here needs more than a few MiB of real memory.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from typing import Any

from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem.device import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB, TiB

BLOCK = 2 * MiB


class _NullRam:
    """Stands in for a RAM block when no real one is available: accepts every call."""

    page_size = 4096
    host_address = 0

    def __init__(self, size: int) -> None:
        self.size = size

    def discard_range(self, offset: int, length: int) -> None:
        pass

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        pass


def _ram(size: int) -> tuple[Any, str]:
    try:
        hostmem = importlib.import_module("ramdiscard.hostmem")
    except ImportError:
        return _NullRam(size), "null"
    return hostmem.RamBlock(size, "anonymous"), "anonymous"


def _device(size: int) -> tuple[VirtioMem, Any, str]:
    ram, kind = _ram(size)
    mr = MemoryRegion.new_ram(f"bench-{size:#x}", ram)
    dev = VirtioMem(mr, addr=4 * GiB, block_size=BLOCK, requested_size=size, policy=DiscardPolicy())
    return dev, ram, kind


def _close(dev: VirtioMem, ram: Any) -> None:
    dev.unrealize()
    close = getattr(ram, "close", None)
    if close is not None:
        close()


def _best(fn: Callable[[], None], repeat: int, number: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def _cycle_cost(size: int, repeat: int, number: int) -> tuple[float, str]:
    """Seconds for one 64-block plug + unplug through handle_request, in the middle of
    the region."""
    dev, ram, kind = _device(size)
    try:
        from ramdiscard.providers.virtio_mem.wire import Request, RequestType

        gpa = dev.addr + (size // 2)
        plug = Request(RequestType.PLUG, gpa, 64).pack()
        unplug = Request(RequestType.UNPLUG, gpa, 64).pack()

        def cycle() -> None:
            dev.handle_request(plug)
            dev.handle_request(unplug)

        cycle()
        return _best(cycle, repeat, number), kind
    finally:
        _close(dev, ram)


def run(quick: bool = False) -> list[dict[str, object]]:
    """Run the benchmarks; ``quick`` uses fewer repetitions (for tests)."""
    repeat, number = (3, 50) if quick else (7, 300)
    results: list[dict[str, object]] = []
    small, small_kind = _cycle_cost(16 * GiB, repeat, number)
    large, large_kind = _cycle_cost(4 * TiB, repeat, number)
    results.append(
        {
            "name": "plug/unplug 64 blocks",
            "region_small": 16 * GiB,
            "region_large": 4 * TiB,
            "ram": f"{small_kind}/{large_kind}",
            "small_s": small,
            "large_s": large,
            "ratio": large / small,
            "target": 1.1,
        }
    )

    dev, ram, kind = _device(1 * TiB)
    try:
        # 1024 plugged runs of 8 blocks spread over the region.
        stride = dev.region_size // 1024
        for i in range(1024):
            dev.plug(dev.addr + i * stride, 8)
        section = MemoryRegionSection(dev.region, 0, dev.region_size, dev.addr)
        runs: list[MemoryRegionSection] = []

        def replay() -> None:
            runs.clear()
            dev.replay_populated(section, runs.append)

        replay_s = _best(replay, repeat, max(1, number // 50))
        assert len(runs) == 1024
        small_section = MemoryRegionSection(dev.region, 5 * stride, 8 * BLOCK, dev.addr + 5 * stride)

        def probe() -> None:
            dev.is_populated(small_section)

        is_pop_s = _best(probe, repeat, number)
        results.append(
            {"name": "replay_populated (1024 runs)", "region": 1 * TiB, "ram": kind, "seconds": replay_s}
        )
        results.append(
            {"name": "is_populated (8 blocks)", "region": 1 * TiB, "ram": kind, "seconds": is_pop_s}
        )
    finally:
        dev.unplug_all()
        _close(dev, ram)
    return results


def main() -> None:
    for row in run():
        print(row)


if __name__ == "__main__":
    main()
