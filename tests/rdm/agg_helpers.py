"""Fixtures for aggregate-manager tests: a fake RAM backend, bitmap sources, a recording listener."""

from __future__ import annotations

from dataclasses import dataclass, field

from ramdiscard.memory import MemoryRegion, MemoryRegionSection, RegionKind
from ramdiscard.rdm import BlockStateManager, RamDiscardListener
from ramdiscard.units import KiB, MiB
from tests.conftest import FakeRam

REGION_SIZE = 16 * MiB
SMALL = 4 * KiB
LARGE = 2 * MiB


def make_region(size: int = REGION_SIZE, name: str = "ram") -> MemoryRegion:
    return MemoryRegion(name, size, RegionKind.RAM, ram=FakeRam(size))


class Source(BlockStateManager):
    """A bitmap-backed test source (the RFC's ``TestSource``)."""


@dataclass(eq=False)
class Recorder(RamDiscardListener):
    """Counts notifications, keeps the populated view at 4 KiB resolution, and refuses the
    ``fail_from``-th populate and every one after it (1-based) when set."""

    double: bool = False
    fail_from: int | None = None
    populates: int = 0
    discards: int = 0
    view: set[int] = field(default_factory=set)
    log: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.double_discard_supported = self.double

    def notify_populate(self, section: MemoryRegionSection) -> None:
        self.populates += 1
        if self.fail_from is not None and self.populates >= self.fail_from:
            raise OSError(16, "listener refuses")
        pages = set(_pages(section))
        assert not pages & self.view, f"populate of already populated memory {section!r}"
        assert self.section is not None and section.end <= self.section.end
        self.view |= pages
        self.log.append(("populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.discards += 1
        pages = set(_pages(section))
        if not self.double_discard_supported:
            assert pages <= self.view, f"discard of unpopulated memory {section!r}"
        self.view -= pages
        self.log.append(("discard", section.offset_within_region, section.size))


def _pages(section: MemoryRegionSection) -> range:
    return range(section.offset_within_region // SMALL, (section.end + SMALL - 1) // SMALL)


def pages_of(runs: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for start, end in runs:
        out |= set(range(start // SMALL, end // SMALL))
    return out


def section(mr: MemoryRegion, offset: int = 0, size: int | None = None, gpa: int = 0) -> MemoryRegionSection:
    return MemoryRegionSection(mr, offset, mr.size - offset if size is None else size, gpa)
