"""AddressSpace and MemoryListener: the flat view of a region tree, and who is told about it.

Rules:

* An address space renders its root region into a *flat view*: sorted, non-overlapping
  sections, each naming the terminal RAM region (aliases resolved), the offset in it, and
  the address. Higher priority subregions hide lower ones; disabled regions are absent;
  containers contribute only their subregions.
* Adjacent pieces of the same region at contiguous offsets merge into one section, unless
  one of them was reached through an *unmergeable* alias (virtio-mem memslots), so such
  aliases always show up as separate sections.
* Only RAM regions appear in flat views: this model has no MMIO.
* A listener sees ``region_add`` for every section of the flat view when it registers,
  ``region_add``/``region_del`` for exactly the sections that appear/vanish on each
  topology change (deletions first), and ``region_del`` for every section when it
  unregisters.
* If ``region_add`` raises during :meth:`AddressSpace.register_listener`, the sections
  already added to that listener are deleted again, the listener is not registered, and
  the error propagates. During a topology change a raising listener cannot stop the
  change; see :class:`~ramdiscard.memory.system.TopologyError`.
* An address space belongs to its root region's memory system (an unplaced root without
  one joins the default system) and re-renders only on that system's topology changes.
"""

from __future__ import annotations

import bisect
import itertools
from contextlib import AbstractContextManager
from dataclasses import dataclass

from ramdiscard.errors import ListenerError
from ramdiscard.memory.region import MemoryRegion, MemoryRegionSection, RegionKind
from ramdiscard.memory.system import MemorySystem, RegionHandle

_serials = itertools.count()


class MemoryListener:
    """Subclass and override :meth:`region_add` / :meth:`region_del` (no-ops by default)."""

    def region_add(self, section: MemoryRegionSection) -> None:
        """A section appeared in the flat view."""

    def region_del(self, section: MemoryRegionSection) -> None:
        """A section vanished from the flat view."""


@dataclass(slots=True)
class _Range:
    start: int
    end: int
    mr: MemoryRegion
    offset_in_region: int
    readonly: bool
    unmergeable: bool


class _FlatBuilder:
    """Fills address ranges in priority order: later (lower priority) fills only gaps."""

    def __init__(self) -> None:
        self.ranges: list[_Range] = []
        self._starts: list[int] = []

    def fill(self, start: int, end: int, mr: MemoryRegion, region_base: int, ro: bool, um: bool) -> None:
        pos = start
        i = bisect.bisect_right(self._starts, pos) - 1
        if i >= 0 and self.ranges[i].end > pos:
            pos = self.ranges[i].end
        i += 1
        while pos < end:
            next_start = self.ranges[i].start if i < len(self.ranges) else end
            gap_end = min(end, next_start)
            if gap_end > pos:
                self.ranges.insert(i, _Range(pos, gap_end, mr, pos - region_base, ro, um))
                self._starts.insert(i, pos)
                i += 1
            if i < len(self.ranges) and self.ranges[i].start < end:
                pos = max(pos, self.ranges[i].end)
                i += 1
            else:
                break

    def render(self, mr: MemoryRegion, base: int, clip_start: int, clip_end: int, ro: bool, um: bool) -> None:
        if not mr.enabled:
            return
        start = max(base, clip_start)
        end = min(base + mr.size, clip_end)
        if end <= start:
            return
        ro = ro or mr.readonly
        um = um or mr.unmergeable
        if mr.kind is RegionKind.ALIAS:
            assert mr.alias_target is not None
            self.render(mr.alias_target, base - mr.alias_offset, start, end, ro, um)
            return
        for sub in mr.subregions:
            self.render(sub, base + sub.offset, start, end, ro, um)
        if mr.kind is RegionKind.RAM:
            self.fill(start, end, mr, base, ro, um)

    def sections(self) -> list[MemoryRegionSection]:
        merged: list[_Range] = []
        for r in self.ranges:
            if merged:
                last = merged[-1]
                if (
                    last.end == r.start
                    and last.mr is r.mr
                    and last.offset_in_region + (last.end - last.start) == r.offset_in_region
                    and last.readonly == r.readonly
                    and not last.unmergeable
                    and not r.unmergeable
                ):
                    last.end = r.end
                    continue
            merged.append(_Range(r.start, r.end, r.mr, r.offset_in_region, r.readonly, r.unmergeable))
        return [
            MemoryRegionSection(r.mr, r.offset_in_region, r.end - r.start, r.start, r.readonly)
            for r in merged
        ]


def render_flatview(root: MemoryRegion) -> list[MemoryRegionSection]:
    """The flat view of ``root`` as seen from address 0."""
    builder = _FlatBuilder()
    builder.render(root, 0, 0, root.size, False, False)
    return builder.sections()


class AddressSpace:
    """A named view of a root region, with memory listeners.

    The address space stays live (re-rendered on topology changes) until :meth:`destroy`
    or until it is garbage collected.
    """

    def __init__(self, name: str, root: MemoryRegion) -> None:
        self.name = name
        self.root = root
        self.serial = next(_serials)
        self._listeners: list[MemoryListener] = []
        system = root.system
        if root._system is None and root.container is None:
            root._system = system
        self.system: MemorySystem = system
        with system.watch_mapping():
            self._view: list[MemoryRegionSection] = render_flatview(root)
            self._mapped: set[int] = {id(s.mr) for s in self._view}
            system.register_space(self)

    def __repr__(self) -> str:
        return f"<AddressSpace {self.name!r}>"

    def flatview(self) -> list[MemoryRegionSection]:
        """The current flat view: sections in address order."""
        with self.system.lock:
            return list(self._view)

    def maps(self, mr: RegionHandle) -> bool:
        """True if ``mr`` appears in the current flat view."""
        return id(mr) in self._mapped

    def transaction(self) -> AbstractContextManager[None]:
        """Batch topology changes of this space's memory system (all its address spaces,
        as QEMU's memory transactions)."""
        return self.system.transaction()

    def register_listener(self, listener: MemoryListener) -> None:
        """Add ``listener`` and send it ``region_add`` for every current section.

        Raises ListenerError if it is already registered here. If ``region_add`` raises,
        the sections already added get ``region_del``, the listener is not registered and
        the error propagates.
        """
        with self.system.lock:
            if any(existing is listener for existing in self._listeners):
                raise ListenerError(f"{listener!r} is already registered with {self!r}")
            done: list[MemoryRegionSection] = []
            try:
                for section in self._view:
                    listener.region_add(section)
                    done.append(section)
            except BaseException:
                for section in reversed(done):
                    listener.region_del(section)
                raise
            self._listeners.append(listener)

    def unregister_listener(self, listener: MemoryListener) -> None:
        """Remove ``listener``, sending it ``region_del`` for every current section."""
        with self.system.lock:
            for i, existing in enumerate(self._listeners):
                if existing is listener:
                    del self._listeners[i]
                    break
            else:
                raise ListenerError(f"{listener!r} is not registered with {self!r}")
            for section in reversed(self._view):
                listener.region_del(section)

    @property
    def listeners(self) -> tuple[MemoryListener, ...]:
        return tuple(self._listeners)

    def destroy(self) -> None:
        """Stop tracking topology changes (listeners get no further notifications)."""
        with self.system.watch_mapping():
            self.system.unregister_space(self)
            self._view = []
            self._mapped = set()

    def update_topology(self) -> list[Exception]:
        """Re-render the flat view and tell the listeners: ``region_del`` for each vanished
        section (listeners in reverse order), then ``region_add`` for each new one. Called
        by the memory system (with its lock held) when a topology change commits; returns
        the listeners' failures, every listener having been called."""
        new_view = render_flatview(self.root)
        old_set = set(self._view)
        new_set = set(new_view)
        removed = [s for s in self._view if s not in new_set]
        added = [s for s in new_view if s not in old_set]
        self._view = new_view
        self._mapped = {id(s.mr) for s in new_view}
        errors: list[Exception] = []
        for section in removed:
            for listener in reversed(self._listeners):
                try:
                    listener.region_del(section)
                except Exception as exc:  # a listener bug must not skip the others
                    errors.append(exc)
        for section in added:
            for listener in list(self._listeners):
                try:
                    listener.region_add(section)
                except Exception as exc:
                    errors.append(exc)
        return errors
