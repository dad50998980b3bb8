"""Helpers for attributes tests: a real RAM region and a listener tracking shared pages."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field

from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.rdm import RamDiscardListener

PAGE = mmap.PAGESIZE


def ram_region(size: int, name: str = "guest-ram") -> MemoryRegion:
    """A RAM region over a real anonymous RamBlock (4 KiB pages, no THP, so resident
    bytes are exact)."""
    return MemoryRegion.new_ram(name, RamBlock(size, name=name, thp=False))


@dataclass(eq=False)
class PageView(RamDiscardListener):
    """Tracks the shared pages it was told about; refuses populates while ``refuse`` is set."""

    refuse: bool = False
    view: set[int] = field(default_factory=set)
    calls: list[tuple[str, int, int]] = field(default_factory=list)

    def notify_populate(self, section: MemoryRegionSection) -> None:
        if self.refuse:
            raise OSError(16, "refused")
        pages = set(range(section.offset_within_region // PAGE, section.end // PAGE))
        assert not pages & self.view
        self.view |= pages
        self.calls.append(("populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        pages = set(range(section.offset_within_region // PAGE, section.end // PAGE))
        assert pages <= self.view
        self.view -= pages
        self.calls.append(("discard", section.offset_within_region, section.size))
