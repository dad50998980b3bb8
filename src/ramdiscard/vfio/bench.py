"""Benchmark: a virtio-mem plug/unplug of 64 x 2 MiB blocks through the full consumer path
against the raw syscalls it boils down to, measured in the same run.

Ours: a PLUG request (bytes) -> :class:`~ramdiscard.virtio_mem.VirtioMem` -> populate
notification -> :class:`~ramdiscard.vfio.VfioContainer` -> ``pin_many`` of 64 granules ->
io_uring ``BUFFERS_UPDATE`` (one per run of consecutive free slots: one here); then the
UNPLUG request -> one discard of the range (``MADV_DONTNEED``, or ``fallocate(PUNCH_HOLE)``
for memfd) -> discard notification -> one unmap -> one ``BUFFERS_UPDATE`` emptying the 64
slots.

Raw: a :class:`~ramdiscard.dma.RawRing` with the same buffer-table size doing the same
syscalls in the same order on the same memory: one ``update_many`` of the 64 ranges; then
the same discard syscall and one ``release_many`` of the 64 slots. Its Python is the
minimum: the list of ranges and the calls.

Method: one pair of rows per memory kind, each with its own raw baseline: anonymous
memory with transparent huge pages (the kernel pins a 2 MiB block in ~4-6 us), anonymous
memory on 4 KiB pages (~40 us per block) and a memfd (shmem, 4 KiB pages). The memory is
populated (untimed) before every plug on both sides, so neither side pays page faults;
populating 128 MiB also flushes the CPU caches, so both sides start cold, as a guest
request arriving after other work would. One more THP pair skips that populate: the pins
then fault in the memory the previous unplug discarded, as in a VM. Repetitions alternate
ours/raw; each figure is the best of N.
"""

from __future__ import annotations

import time
from typing import Any

from ramdiscard.dma import IoUringDmaBackend, RawRing
from ramdiscard.dma.iouring import DEFAULT_SLOTS_PER_RING
from ramdiscard.hostmem import RamBlock, syscalls
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB
from ramdiscard.vfio.container import VfioContainer
from ramdiscard.virtio_mem import Request, RequestType, VirtioMem

BLOCK = 2 * MiB
BLOCKS = 64
ADDR = 4 * GiB
PLUG_TARGET = 1.15
UNPLUG_TARGET = 1.25

MEMORY_KINDS: dict[str, dict[str, Any]] = {
    "THP": {"backing": "anonymous", "thp": True},
    "THP, pin faults it in": {"backing": "anonymous", "thp": True, "prepopulate": False},
    "4 KiB pages": {"backing": "anonymous", "thp": False},
    "memfd": {"backing": "memfd"},
}
"""Row label -> RamBlock arguments, plus ``prepopulate`` (default True). Without it the
plug pins memory that the previous unplug discarded, so the pin faults it in: what a
vfio container does when a guest plugs a block in a real VM."""

def _raw_cycle(ring: RawRing, ram: RamBlock, size: int) -> tuple[int, int]:
    base = ram.host_address
    fd = ram.fd
    clock = time.perf_counter_ns
    t0 = clock()
    pinned = ring.update_many(0, [(base + i * BLOCK, BLOCK) for i in range(BLOCKS)])
    t1 = clock()
    if fd is None:
        syscalls.madvise(base, size, syscalls.MADV_DONTNEED)
    else:
        syscalls.punch_hole(fd, 0, size)
    released = ring.release_many(0, BLOCKS)
    t2 = clock()
    if pinned != BLOCKS or released != BLOCKS:
        raise RuntimeError(f"raw ring updated {pinned}/{released} of {BLOCKS} slots")
    return t1 - t0, t2 - t1


def _measure(kind: dict[str, Any], reps: int, slots_per_ring: int) -> dict[str, int]:
    size = BLOCK * BLOCKS
    policy = DiscardPolicy()
    kind = dict(kind)
    prepopulate = kind.pop("prepopulate", True)
    ram = RamBlock(size, name="bench-vmem", **kind)
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
            if prepopulate:
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
            if prepopulate:
                ram.populate(0, size)
            p, u = _raw_cycle(ring, ram, size)
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
    return best


def run(
    quick: bool = False,
    slots_per_ring: int = DEFAULT_SLOTS_PER_RING,
    kinds: list[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows for plug and unplug per memory kind (:data:`MEMORY_KINDS`, all by default):
    best-of-N ns for ours and raw, ratio and target."""
    reps = 7 if quick else 25
    rows = []
    for label in kinds or list(MEMORY_KINDS):
        best = _measure(MEMORY_KINDS[label], reps, slots_per_ring)
        for op, target in (("plug", PLUG_TARGET), ("unplug", UNPLUG_TARGET)):
            ours, raw = best[f"ours_{op}"], best[f"raw_{op}"]
            rows.append(
                {
                    "group": "vfio",
                    "name": f"{op} {BLOCKS} x 2 MiB, {label} (virtio-mem -> container -> io_uring)",
                    "memory": label,
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

    for slots in [int(a) for a in sys.argv[1:]] or [DEFAULT_SLOTS_PER_RING]:
        for row in run(slots_per_ring=slots):
            print(
                f"{row['name']:<72} slots={row['slots_per_ring']:<6} ours {row['ours_ns'] / 1e3:8.1f} us  "
                f"raw {row['raw_ns'] / 1e3:8.1f} us  ratio {row['ratio']:.3f} (target {row['target']})"
            )
