"""Benchmark: the guest driver model's cost per request over the device's typed API.

ours = the GuestDriver plugging and unplugging 1 GiB (2 MiB blocks) through request bytes
and config reads; raw = the same PLUG/UNPLUG sequence sent straight to
``VirtioMem.plug`` / ``unplug`` (no encoding, no driver logic), measured in the same run.
The device does no host work here (no prealloc, no consumer), so the ratio shows the
driver's whole overhead; with real pinning each request costs 100x more.
"""

from __future__ import annotations

import time

from ramdiscard.guest.driver import GuestDriver
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm.policy import DiscardPolicy
from ramdiscard.units import GiB, MiB

_ADDR = 0x1_0000_0000


def run(quick: bool = False) -> list[dict[str, object]]:
    size = 1 * GiB
    rounds = 3 if quick else 10
    block = RamBlock(2 * GiB, name="bench-guest")
    try:
        dev = VirtioMem(
            MemoryRegion.new_ram("bench-guest", block), addr=_ADDR, block_size=2 * MiB, policy=DiscardPolicy()
        )
        drv = GuestDriver(dev)
        best_ours = best_raw = float("inf")
        requests = 0
        for _ in range(rounds):
            t0 = time.perf_counter_ns()
            for target in (size, 0):
                dev.requested_size = target
                drv.config_changed()
                requests += len(drv.run_until_converged())
            best_ours = min(best_ours, time.perf_counter_ns() - t0)
            dev.requested_size = size
            t0 = time.perf_counter_ns()
            for i in range(size // (128 * MiB)):
                dev.plug(_ADDR + i * 128 * MiB, 64)
            for i in reversed(range(size // (128 * MiB))):
                dev.unplug(_ADDR + i * 128 * MiB, 64)
            best_raw = min(best_raw, time.perf_counter_ns() - t0)
            dev.requested_size = 0
        dev.unrealize()
    finally:
        block.close()
    return [
        {
            "group": "guest",
            "name": "driver plug+unplug 1 GiB (16 requests)",
            "ours_ns": best_ours,
            "raw_ns": best_raw,
            "ratio": best_ours / best_raw,
            "target": 3.0,
            "requests_per_round": requests // rounds,
        }
    ]
