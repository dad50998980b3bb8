"""LiveBlock: what a RAM block notifier is told about one registered RAM block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.interfaces import reserved_size
from ramdiscard.rdm.manager import RamDiscardManager, manager_of

if TYPE_CHECKING:
    from ramdiscard.interfaces import HostMemory
    from ramdiscard.memory.region import MemoryRegion


@dataclass(frozen=True, eq=False, slots=True)
class LiveBlock:
    """A registered RAM region and the RAM block behind it, read live.

    QEMU's RAMBlock notifiers receive ``(host, size, max_size)``; this carries the region
    too, because a consumer that honours RamDiscardManagers needs it. Every property reads
    the current value. Two LiveBlocks of the same region are interchangeable: key
    per-block state on :attr:`region`.
    """

    region: MemoryRegion

    @property
    def ram(self) -> HostMemory:
        ram = self.region.ram
        assert ram is not None  # the registry only holds RAM regions with a block
        return ram

    @property
    def name(self) -> str:
        return self.region.name

    @property
    def host_address(self) -> int:
        return int(self.ram.host_address)

    @property
    def size(self) -> int:
        """The used length of the RAM block (it changes with a resize)."""
        return int(self.ram.size)

    @property
    def max_size(self) -> int:
        """Bytes reserved for the block: its ``max_size`` if it has one, else its size."""
        return reserved_size(self.ram)

    @property
    def page_size(self) -> int:
        return int(self.ram.page_size)

    @property
    def is_mapped(self) -> bool:
        """Whether the region is in some live address space's flat view."""
        return self.region.is_mapped

    @property
    def ram_discard_manager(self) -> RamDiscardManager | None:
        return manager_of(self.region)

    def __repr__(self) -> str:
        return f"<LiveBlock {self.name!r} size={self.size:#x} max={self.max_size:#x}>"
