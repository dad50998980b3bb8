"""Shared setup of the migration benchmarks (:mod:`ramdiscard.bench.migration`): a
virtio-mem region in its own address space, plugged in spread runs and filled."""

from __future__ import annotations

from ramdiscard.units import GiB, MiB

WRITE_RATE = 50 * MiB
"""The guest writer's rate in the live benchmarks (bytes per second)."""


class BenchGuest:
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
        """Populate the plugged runs and write each page's offset into its first 8 bytes."""
        import numpy as np

        for start, size in self.dev.plugged_ranges():
            self.ram.populate(start, size)
            words = np.frombuffer(self.ram.view[start : start + size], dtype=np.uint64).reshape(-1, 512)
            words[:, 0] = np.arange(start, start + size, 4096, dtype=np.uint64)

    @classmethod
    def plugged_filled(cls, region: int, plugged: int) -> BenchGuest:
        """A source: ``plugged`` bytes plugged in spread runs of a ``region``-byte device, filled."""
        guest = cls(region, 2 * MiB)
        try:
            guest.plug_spread(plugged)
            guest.fill()
        except BaseException:
            guest.close()
            raise
        return guest

    def close(self) -> None:
        for sub in self.root.subregions:
            self.root.del_subregion(sub)
        self.space.destroy()
        self.dev.unrealize()
        self.ram.close()
