"""The precopy source's view of one RAM region: its populated runs (followed through a
RamDiscardListener when the devices stay resizable) and its write tracker (rules in
:mod:`ramdiscard.migration.precopy`)."""

from __future__ import annotations

import numpy as np

from ramdiscard.hostmem import uffd
from ramdiscard.interfaces import FileBackedMemory
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.migration.layout import RamRegion
from ramdiscard.migration.runs import Coverage, Runs
from ramdiscard.rdm.listener import RamDiscardListener

PAGE = 4096


class PlugWatcher(RamDiscardListener):
    """Follows a device's populated set for a resizable precopy (module rules)."""

    double_discard_supported = True

    def __init__(self) -> None:
        self.plugged = Coverage()
        self.fresh = Coverage()
        self.changed = False
        self.replaying = True

    def notify_populate(self, section: MemoryRegionSection) -> None:
        s = section.offset_within_region
        self.plugged.add(s, s + section.size)
        if not self.replaying:
            self.fresh.add(s, s + section.size)
            self.changed = True

    def notify_discard(self, section: MemoryRegionSection) -> None:
        s = section.offset_within_region
        self.plugged.remove(s, s + section.size)
        self.fresh.remove(s, s + section.size)
        self.changed = True


class TrackedRegion:
    def __init__(self, region: RamRegion, watch: bool = False) -> None:
        self.region = region
        self.view = region.view
        self.watcher: PlugWatcher | None = None
        if watch and region.device is not None:
            self.watcher = PlugWatcher()
            region.device.register_listener(self.watcher, MemoryRegionSection(region.mr, 0, region.mr.size))
            self.watcher.replaying = False
            self.runs: Runs = self.watcher.plugged.runs()
        else:
            self.runs = region.populated_runs()
        self.tracker: uffd.WriteTracker | None = None
        self._pages: np.ndarray | None = None

    @property
    def pages(self) -> np.ndarray:
        """The region's memory as rows of one 4 KiB page (no copy)."""
        if self._pages is None:
            self._pages = np.frombuffer(self.view, dtype=np.uint8).reshape(-1, PAGE)
        return self._pages

    def clip(self, start: int, end: int) -> Runs:
        """The parts of ``[start, end)`` populated now (call under the guard)."""
        if self.watcher is None:
            return [(start, end - start)]
        return self.watcher.plugged.clip(start, end)

    def take_fresh(self) -> Runs:
        """Ranges populated since the last call, now write-protected (under the guard)."""
        assert self.watcher is not None
        fresh = self.watcher.fresh.runs()
        self.watcher.fresh = Coverage()
        self.runs = self.watcher.plugged.runs()
        if self.tracker is not None:
            for s, n in fresh:
                self.tracker.protect(s, n)
        return fresh

    def start_tracking(self) -> None:
        ram = self.region.mr.ram
        assert ram is not None  # a RamRegion is a RAM region
        shmem = isinstance(ram, FileBackedMemory) and ram.fd is not None
        self.tracker = uffd.WriteTracker(ram.host_address, self.region.size, shmem=shmem)
        for s, n in self.runs:
            self.tracker.protect(s, n)

    def scan(self) -> Runs:
        assert self.tracker is not None
        out: Runs = []
        for s, n in self.runs:
            out.extend(self.tracker.scan_reset(s, n))
        return out

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.watcher is not None and self.region.device is not None:
            self.region.device.unregister_listener(self.watcher)
            self.watcher = None


def tracking_problem(regions: list[TrackedRegion]) -> str | None:
    why = uffd.available()
    if why is not None:
        return why
    for r in regions:
        if r.region.page_size != PAGE:
            return f"region {r.region.mr.name!r} has {r.region.page_size:#x}-byte pages (tracked: 4 KiB only)"
    return None
