"""Benchmark: a virtio-mem plug/unplug of 64 x 2 MiB blocks through the full consumer path
against the raw syscalls it boils down to, measured in the same run.

Ours: a PLUG request (bytes) -> :class:`~ramdiscard.virtio_mem.VirtioMem` -> populate
notification -> :class:`~ramdiscard.vfio.VfioContainer` -> 64 io_uring pins (one
``BUFFERS_UPDATE`` each); then the UNPLUG request -> one ``MADV_DONTNEED`` of the range ->
discard notification -> one unmap -> 64 unpins.

Raw: a :class:`~ramdiscard.dma.RawRing` with the same buffer-table size doing the same 64
pins; then the same ``madvise`` and the same 64 unpins, in the same order, on the same
memory.

Method: anonymous THP memory, populated (untimed) before every plug on both sides, so
neither side pays page faults and hot/cold host effects stay out of the timed part;
repetitions alternate ours/raw; each figure is the best of N.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Any

from ramdiscard.dma import IoUringDmaBackend, RawRing
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB
from ramdiscard.vfio.container import VfioContainer
from ramdiscard.virtio_mem import Request, RequestType, VirtioMem

BLOCK = 2 * MiB
BLOCKS = 64
ADDR = 4 * GiB
SLOTS_PER_RING = 1024
PLUG_TARGET = 1.15
UNPLUG_TARGET = 1.25
_MADV_DONTNEED = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_madvise = _libc.madvise
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int


def _raw_cycle(ring: RawRing, base: int, size: int) -> tuple[int, int]:
    clock = time.perf_counter_ns
    update = ring.update
    t0 = clock()
    for i in range(BLOCKS):
        update(i, base + i * BLOCK, BLOCK)
    t1 = clock()
    if _madvise(base, size, _MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED)")
    for i in range(BLOCKS):
        update(i, 0, 0)
    t2 = clock()
    return t1 - t0, t2 - t1


def run(quick: bool = False, slots_per_ring: int = SLOTS_PER_RING) -> list[dict[str, Any]]:
    """Rows for plug and unplug: best-of-N ns for ours and raw, ratio and target."""
    reps = 7 if quick else 25
    size = BLOCK * BLOCKS
    policy = DiscardPolicy()
    ram = RamBlock(size, "anonymous", name="bench-vmem")
    mr = MemoryRegion.new_ram("bench-vmem", ram)
    dev = VirtioMem(mr, addr=ADDR, block_size=BLOCK, requested_size=size, policy=policy)
    root = MemoryRegion.new_container("system", ADDR + size)
    root.add_subregion(ADDR, dev.device_region)
    space = AddressSpace("system", root)
    backend = IoUringDmaBackend(slots_per_ring=slots_per_ring)
    ring = RawRing()
    container = VfioContainer(backend, policy=policy)
    plug = Request(RequestType.PLUG, ADDR, BLOCKS).pack()
    unplug = Request(RequestType.UNPLUG, ADDR, BLOCKS).pack()
    best = {"ours_plug": 1 << 62, "ours_unplug": 1 << 62, "raw_plug": 1 << 62, "raw_unplug": 1 << 62}
    try:
        ring.register_sparse(slots_per_ring)
        container.attach(space)
        clock = time.perf_counter_ns
        handle = dev.handle_request
        for _ in range(reps):
            ram.populate(0, size)
            t0 = clock()
            a = handle(plug)
            t1 = clock()
            b = handle(unplug)
            t2 = clock()
            if a[:2] != b"\0\0" or b[:2] != b"\0\0" or container.mapping_count:
                raise RuntimeError(f"unexpected responses {a.hex()} {b.hex()}")
            best["ours_plug"] = min(best["ours_plug"], t1 - t0)
            best["ours_unplug"] = min(best["ours_unplug"], t2 - t1)
            ram.populate(0, size)
            p, u = _raw_cycle(ring, ram.host_address, size)
            best["raw_plug"] = min(best["raw_plug"], p)
            best["raw_unplug"] = min(best["raw_unplug"], u)
    finally:
        if container.address_space is not None:
            container.detach()
        ring.close()
        backend.close()
        root.del_subregion(dev.device_region)
        space.destroy()
        dev.unrealize()
        ram.close()
    rows = []
    for op, target in (("plug", PLUG_TARGET), ("unplug", UNPLUG_TARGET)):
        ours, raw = best[f"ours_{op}"], best[f"raw_{op}"]
        rows.append(
            {
                "group": "vfio",
                "name": f"{op} {BLOCKS} x 2 MiB (virtio-mem -> container -> io_uring)",
                "ours_ns": ours,
                "raw_ns": raw,
                "ratio": ours / raw,
                "target": target,
                "ok": ours / raw <= target,
                "per_block_ours_us": ours / BLOCKS / 1e3,
                "per_block_raw_us": raw / BLOCKS / 1e3,
                "slots_per_ring": slots_per_ring,
                "reps": reps,
            }
        )
    return rows


if __name__ == "__main__":
    import sys

    for slots in [int(a) for a in sys.argv[1:]] or [SLOTS_PER_RING]:
        for row in run(slots_per_ring=slots):
            print(
                f"{row['name']:<58} slots={row['slots_per_ring']:<6} ours {row['ours_ns'] / 1e3:8.1f} us  "
                f"raw {row['raw_ns'] / 1e3:8.1f} us  ratio {row['ratio']:.3f} (target {row['target']})"
            )
