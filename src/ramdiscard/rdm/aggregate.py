"""AggregateManager: one region's RamDiscardManager built from several sources.

Rules (the 2026 "RamDiscardSource" RFC's semantics, on this project's stricter contract):

* A *source* answers the query half of the contract for one region
  (:class:`RamDiscardSource`: granularity, is_populated, replay_populated,
  replay_discarded). Providers (RamDiscardManagers such as virtio-mem and guest_memfd
  attributes) are sources; their state changes reach the aggregate through the
  ``sink`` hook of :class:`~ramdiscard.rdm.manager.RamDiscardManager`.
* A byte is populated in aggregate only if *every* source says populated; with no sources
  everything is populated. The granularity is the minimum over the sources (the host page
  size with none).
* Listeners see only aggregate changes:
  - a source populating a range notifies populate only for the parts every *other* source
    already considers populated; a refusal rolls back every listener told so far (the
    refusing one undoes itself) and propagates, so the source keeps its old state;
  - a source discarding a range notifies discard only for the parts every other source
    considers populated; discarding what another source already discarded sends nothing
    ("redundant discard");
  - adding a source discards, to each listener, what the new source has discarded but the
    aggregate had populated; removing a source populates what becomes populated, with
    rollback on refusal. A refused removal leaves the source attached; a discard that
    raises during an add (a listener bug) still reaches every listener, is then rolled
    back by re-populating (last-in first-out), and the source is not added.
* Adding a source twice, or one attached to another aggregate, or one with listeners of
  its own raises ManagerBusy; removing an unknown source raises SourceNotFound. Both change
  nothing.
* Replays intersect the sources' populated runs and call ``fn`` once per maximal run.

Region helpers :func:`add_ram_discard_source` / :func:`remove_ram_discard_source` are what
providers use instead of ``MemoryRegion.set_ram_discard_manager``: the first source of a
region becomes its manager directly (single-provider behaviour is untouched); a second one
turns the region's manager into an aggregate of both. Replacing the manager object follows
the region's "not while mapped" rule (RegionMapped); adding a source to, or removing one
from, an *existing* aggregate is allowed while mapped, because the manager memory listeners
looked up stays the same and its listeners are told every change.

Theory of operation: the aggregate keeps no state of its own. Every question is answered
by intersecting the sources' populated runs (plain interval lists) over the range in
question, so a source-driven change is filtered by querying the *other* sources only,
whatever order the source updates its own state in.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ramdiscard.errors import InvalidArgument, ManagerBusy, RegionMapped
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.rdm.manager import RamDiscardManager, ReplayFn, manager_of
from ramdiscard.units import is_power_of_2

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion

Runs = list[tuple[int, int]]
"""Sorted, disjoint, non-adjacent-or-adjacent ``(start, end)`` region-offset intervals."""


class SourceNotFound(InvalidArgument, LookupError):
    """The source is not part of this region's manager (QEMU's -ENOENT); nothing changed."""


@runtime_checkable
class RamDiscardSource(Protocol):
    """The query half of the RDM contract, for one region."""

    @property
    def region(self) -> MemoryRegion: ...

    def get_min_granularity(self, mr: MemoryRegion) -> int: ...

    def is_populated(self, section: MemoryRegionSection) -> bool: ...

    def replay_populated(self, section: MemoryRegionSection, fn: ReplayFn) -> None: ...

    def replay_discarded(self, section: MemoryRegionSection, fn: ReplayFn) -> None: ...


class AggregateManager(RamDiscardManager):
    """The manager of a region with several sources; see the module rules."""

    def __init__(self, region: MemoryRegion) -> None:
        super().__init__(region)
        self._sources: list[RamDiscardSource] = []

    def __repr__(self) -> str:
        names = ", ".join(type(s).__name__ for s in self._sources)
        return f"<AggregateManager {self.region.name!r} sources=[{names}]>"

    @property
    def sources(self) -> tuple[RamDiscardSource, ...]:
        """Sources in the order they were added."""
        with self._lock:
            return tuple(self._sources)

    # -- queries ------------------------------------------------------------------------

    def get_min_granularity(self, mr: MemoryRegion) -> int:
        self.check_region(mr)
        with self._lock:
            if not self._sources:
                ram = self.region.ram
                return ram.page_size if ram is not None else mmap.PAGESIZE
            return min(s.get_min_granularity(mr) for s in self._sources)

    def is_populated(self, section: MemoryRegionSection) -> bool:
        with self._lock:
            self.check_section(section)
            return all(s.is_populated(section) for s in self._sources)

    def replay_populated(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        with self._lock:
            self.check_section(section)
            runs = self.populated_runs(section.offset_within_region, section.size)
            _replay_runs(section, runs, fn)

    def replay_discarded(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        with self._lock:
            self.check_section(section)
            start, end = section.offset_within_region, section.end
            runs = _complement(self.populated_runs(start, section.size), start, end)
            _replay_runs(section, runs, fn)

    def populated_runs(self, offset: int, size: int, *, exclude: object = None) -> Runs:
        """Maximal aggregate-populated runs inside ``[offset, offset+size)``, ignoring the
        source ``exclude`` (used to ask "what do the *other* sources allow")."""
        with self._lock:
            if size <= 0:
                return []
            runs: Runs = [(offset, offset + size)]
            for src in self._sources:
                if src is exclude:
                    continue
                runs = _intersect(runs, _source_runs(src, self.region, offset, size))
                if not runs:
                    break
            return runs

    # -- source-driven notifications (NotificationSink) -------------------------------

    def source_populate(self, source: object, offset: int, size: int) -> None:
        """``source`` is about to mark the range populated; notify what becomes populated
        in aggregate. Raises after a full rollback if a listener refuses."""
        with self._lock:
            self._populate_runs(self.populated_runs(offset, size, exclude=source))

    def source_discard(self, source: object, offset: int, size: int) -> None:
        """``source`` discarded the range; notify the part that was populated in aggregate."""
        with self._lock:
            runs = self.populated_runs(offset, size, exclude=source)
            self._notify_discard_runs([(start, end - start) for start, end in runs])

    def source_discard_all(self, source: object, runs: list[tuple[int, int]]) -> None:
        """``source`` discards everything; its populated runs are ``(offset, size)``."""
        with self._lock:
            visible: list[tuple[int, int]] = []
            for offset, size in runs:
                visible += [(s, e - s) for s, e in self.populated_runs(offset, size, exclude=source)]
            if visible:
                self._notify_discard_all(visible)

    def _populate_runs(self, runs: Runs) -> None:
        self._notify_populate_runs([(start, end - start) for start, end in runs])

    # -- source management ------------------------------------------------------------

    def add_source(self, source: RamDiscardSource) -> None:
        """Attach ``source``; listeners get discards for what it newly hides.

        Raises ManagerBusy (already a source here or elsewhere, or it has listeners),
        InvalidArgument (another region, bad granularity), ListenerError from inside a
        notification. Nothing changes when it raises.
        """
        with self._lock:
            self._check_not_notifying("add a source")
            if any(s is source for s in self._sources):
                raise ManagerBusy(f"{source!r} is already a source of {self!r}")
            if source.region is not self.region:
                raise InvalidArgument(
                    f"{source!r} belongs to {source.region.name!r}, not {self.region.name!r}"
                )
            if isinstance(source, RamDiscardManager):
                if source.sink is not None:
                    raise ManagerBusy(f"{source!r} is already a source of {source.sink!r}")
                if source.listeners:
                    raise ManagerBusy(f"{source!r} has listeners of its own; unregister them first")
                if source is self:
                    raise InvalidArgument("an aggregate cannot be its own source")
            gran = source.get_min_granularity(self.region)
            if not is_power_of_2(gran):
                raise InvalidArgument(f"{source!r} granularity {gran:#x} is not a power of two")
            hidden = _intersect(
                self.populated_runs(0, self.region.size),
                _complement(_source_runs(source, self.region, 0, self.region.size), 0, self.region.size),
            )
            self._discard_with_undo(hidden)
            if isinstance(source, RamDiscardManager):
                source._attach_sink(self)
            self._sources.append(source)

    def remove_source(self, source: RamDiscardSource) -> None:
        """Detach ``source``; listeners get populates for what it no longer hides.

        Raises SourceNotFound for an unknown source, ListenerError from inside a
        notification, or a refusing listener's exception after the rollback; nothing
        changes then.
        """
        with self._lock:
            self._check_not_notifying("remove a source")
            if not any(s is source for s in self._sources):
                raise SourceNotFound(f"{source!r} is not a source of {self!r}")
            size = self.region.size
            revealed = _intersect(
                self.populated_runs(0, size, exclude=source),
                _complement(_source_runs(source, self.region, 0, size), 0, size),
            )
            self._populate_runs(revealed)
            self._sources = [s for s in self._sources if s is not source]
            if isinstance(source, RamDiscardManager):
                source._detach_sink()

    def _discard_with_undo(self, runs: Runs) -> None:
        """Discard ``runs`` to every listener; should any raise (a contract violation),
        re-populate what was discarded and raise (see :meth:`Notifier.discard_or_undo`)."""
        self._notifier.discard_or_undo([(start, end - start) for start, end in runs])


# -- region helpers ---------------------------------------------------------------------


def add_ram_discard_source(region: MemoryRegion, source: RamDiscardManager) -> RamDiscardManager:
    """Make ``source`` answer for ``region``, alone or together with the current manager.

    No manager: ``source`` becomes it. An AggregateManager: ``source`` is added to it.
    Another provider: both become sources of a new AggregateManager, which replaces it
    (RegionMapped while the region is mapped; ManagerBusy if that provider has listeners
    registered directly). Returns the region's manager afterwards. Nothing changes when it
    raises.
    """
    with region.system.lock:
        current = manager_of(region)
        if current is None:
            region.set_ram_discard_manager(source)
            return source
        if isinstance(current, AggregateManager):
            current.add_source(source)
            return current
        if current is source:
            raise ManagerBusy(f"{source!r} already manages {region.name!r}")
        if current.listeners:
            raise ManagerBusy(
                f"{region.name!r}: cannot aggregate {current!r}, it has listeners registered directly"
            )
        if region.is_mapped:
            raise RegionMapped(
                f"RamDiscardManager of {region.name!r} cannot be replaced by an aggregate while mapped"
            )
        agg = AggregateManager(region)
        agg.add_source(current)
        try:
            agg.add_source(source)
        except BaseException:
            agg.remove_source(current)
            raise
        region.set_ram_discard_manager(None)
        region.set_ram_discard_manager(agg)
        return agg


def remove_ram_discard_source(region: MemoryRegion, source: RamDiscardManager) -> None:
    """Undo :func:`add_ram_discard_source`.

    If ``source`` is the manager itself it is cleared (RegionMapped while mapped). If it
    is a source of the region's aggregate it is removed (listeners are told); when the
    region is unmapped and the aggregate has no listeners and at most one source left, the
    aggregate is dissolved: the remaining provider becomes the manager again, or the region
    has none. SourceNotFound otherwise.
    """
    with region.system.lock:
        current = manager_of(region)
        if current is not None and current is source:
            region.set_ram_discard_manager(None)
            return
        if not isinstance(current, AggregateManager):
            raise SourceNotFound(f"{source!r} is not a source of {region.name!r}")
        current.remove_source(source)
        if current.listeners or region.is_mapped:
            return
        rest = current.sources
        if len(rest) <= 1:
            # Back to the single-provider shape, so the last provider's own
            # set_ram_discard_manager(None) at teardown finds itself there.
            for last in rest:
                current.remove_source(last)
            region.set_ram_discard_manager(None)
            for last in rest:
                if isinstance(last, RamDiscardManager):
                    region.set_ram_discard_manager(last)


# -- interval helpers -------------------------------------------------------------------


def _source_runs(src: RamDiscardSource, region: MemoryRegion, offset: int, size: int) -> Runs:
    runs: Runs = []

    def add(part: MemoryRegionSection) -> None:
        start, end = part.offset_within_region, part.end
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))

    src.replay_populated(MemoryRegionSection(region, offset, size), add)
    return runs


def _intersect(a: Runs, b: Runs) -> Runs:
    out: Runs = []
    i = j = 0
    while i < len(a) and j < len(b):
        start = max(a[i][0], b[j][0])
        end = min(a[i][1], b[j][1])
        if start < end:
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _complement(runs: Runs, start: int, end: int) -> Runs:
    out: Runs = []
    pos = start
    for s, e in runs:
        if s > pos:
            out.append((pos, s))
        pos = max(pos, e)
    if pos < end:
        out.append((pos, end))
    return out


def _replay_runs(section: MemoryRegionSection, runs: Runs, fn: ReplayFn) -> None:
    for start, end in runs:
        part = section.intersect(start, end - start)
        if part is not None:
            fn(part)
