"""A small real RAM block for attributes tests (anonymous private mapping), standing in for
``ramdiscard.hostmem.RamBlock`` until that lands: discard_range, populate, resident_bytes."""

from __future__ import annotations

import ctypes
import mmap
from dataclasses import dataclass, field

from ramdiscard.memory import MemoryRegion, MemoryRegionSection, RegionKind
from ramdiscard.rdm import RamDiscardListener

PAGE = mmap.PAGESIZE
MADV_POPULATE_WRITE = 23

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


class AnonRam:
    def __init__(self, size: int) -> None:
        self.size = size
        self.page_size = PAGE
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def discard_range(self, offset: int, length: int) -> None:
        self._map.madvise(mmap.MADV_DONTNEED, offset, length)

    def populate(self, offset: int, length: int) -> None:
        self._map.madvise(MADV_POPULATE_WRITE, offset, length)

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        length = self.size - offset if length is None else length
        vec = ctypes.create_string_buffer(length // PAGE)
        if _libc.mincore(self.host_address + offset, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(b & 1 for b in vec.raw) * PAGE


def ram_region(size: int, name: str = "guest-ram") -> MemoryRegion:
    return MemoryRegion(name, size, RegionKind.RAM, ram=AnonRam(size))


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
