"""Helpers for attributes tests: a real RAM region and a listener tracking shared pages."""

from __future__ import annotations

import functools
import mmap
from dataclasses import dataclass, field

import pytest

from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.attributes import GmemUnavailable, open_guest_memfd_vm
from ramdiscard.rdm import RamDiscardListener

PAGE = mmap.PAGESIZE


def ram_region(size: int, name: str = "guest-ram") -> MemoryRegion:
    """A RAM region over a real anonymous RamBlock (4 KiB pages, no THP, so resident
    bytes are exact)."""
    return MemoryRegion.new_ram(name, RamBlock(size, name=name, thp=False))


@functools.cache
def guest_memfd_missing() -> str | None:
    """Why this host has no usable guest_memfd (a KVM VM is probed once), or None."""
    try:
        open_guest_memfd_vm().close()
    except GmemUnavailable as exc:
        return str(exc)
    return None


needs_guest_memfd = pytest.mark.skipif(
    guest_memfd_missing() is not None, reason=f"no guest_memfd on this host: {guest_memfd_missing()}"
)
"""Mark for tests of the real guest_memfd path: they skip, with the probe's reason, where
KVM or KVM_CAP_GUEST_MEMFD is missing, instead of silently running the model."""


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
