"""A small "machine" for migration and dump tests: low RAM without a manager, plus a
virtio-mem device over real host memory, mapped in one address space."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

BS = 2 * MiB
ADDR = 4 * GiB


class Machine:
    """``size`` bytes of virtio-mem RAM at ``addr`` (block size ``block``), and ``low``
    bytes of plain RAM at 0 (0: none)."""

    def __init__(
        self,
        size: int = 64 * MiB,
        *,
        backing: str = "anonymous",
        block: int = BS,
        addr: int = ADDR,
        low: int = 4 * MiB,
        dynamic: bool = False,
        dev_id: str = "vmem0",
        thp: bool = True,
        prealloc: bool = False,
    ) -> None:
        kw = {"thp": thp} if backing == "anonymous" else {}
        self.ram = RamBlock(size, backing, name=f"{dev_id}-ram", **kw)  # type: ignore[arg-type]
        self.mr = MemoryRegion.new_ram(f"{dev_id}-ram", self.ram)
        self.policy = DiscardPolicy()
        self.dev = VirtioMem(
            self.mr,
            id=dev_id,
            addr=addr,
            block_size=block,
            requested_size=size,
            policy=self.policy,
            dynamic_memslots=dynamic,
            memslot_limit=4 if dynamic else None,
            prealloc=prealloc,
        )
        self.root = MemoryRegion.new_container("system", addr + size)
        self.low: RamBlock | None = None
        if low:
            self.low = RamBlock(low, backing, name="pc.ram")
            self.low_mr = MemoryRegion.new_ram("pc.ram", self.low)
            self.root.add_subregion(0, self.low_mr)
        self.root.add_subregion(addr, self.dev.device_region)
        self.space = AddressSpace("system", root=self.root)
        self.block = block

    @property
    def devices(self) -> list[VirtioMem]:
        return [self.dev]

    def plug_blocks(self, blocks: Iterable[int]) -> None:
        for b in sorted(set(blocks)):
            assert self.dev.plug(self.dev.addr + b * self.block, 1).name == "ACK"

    def plugged_blocks(self) -> list[int]:
        out: list[int] = []
        for start, size in self.dev.plugged_ranges():
            out.extend(range(start // self.block, (start + size) // self.block))
        return out

    def fill(self, seed: int) -> None:
        """Deterministic content in every plugged block and the low RAM."""
        for start, size in self.dev.plugged_ranges():
            _pattern(self.ram.view[start : start + size], seed ^ start)
        if self.low is not None:
            _pattern(self.low.view, seed ^ 0x5A5A)

    def digests(self) -> dict[int, int]:
        """crc32 of every plugged block (block index -> crc), and of the low RAM (-1)."""
        out = {
            b: zlib.crc32(self.ram.view[b * self.block : (b + 1) * self.block]) for b in self.plugged_blocks()
        }
        if self.low is not None:
            out[-1] = zlib.crc32(self.low.view)
        return out

    def resident_outside_plugged(self) -> int:
        total = 0
        for start, end in self.dev.discarded_runs():
            total += self.ram.resident_bytes(start, end - start)
        return total

    def close(self) -> None:
        for sub in self.root.subregions:
            self.root.del_subregion(sub)
        self.space.destroy()
        for listener in self.dev.listeners:
            self.dev.unregister_listener(listener)
        self.dev.unrealize()
        self.ram.close()
        if self.low is not None:
            self.low.close()


def _pattern(view: memoryview, seed: int) -> None:
    arr = np.frombuffer(view, dtype=np.uint64)
    arr[:] = np.arange(arr.size, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
        seed & (2**63 - 1)
    )
