"""MemorySystem: one machine's memory context (QEMU keeps it in globals; here it is a value).

Rules:

* A system owns what a machine's memory shares: the topology lock (the model's big lock,
  re-entrant), the transaction depth and its pending commit, the live address spaces, the
  mapping observers, the RAM regions created in it, the RAM-region observers, and one
  instance per kind of the *components* that higher layers attach to it
  (:meth:`MemorySystem.component`: the RAM-block registry, the discard policy).
* Every region belongs to at most one system, every address space to its root's system.
  A topology change re-renders only the address spaces of the system it happened in and
  tells only that system's observers; two systems share nothing, so two machines in one
  process do not see each other's changes, policies or registries.
* A change made outside a transaction re-renders the system's live address spaces at once.
  Inside :meth:`MemorySystem.transaction` (nestable) re-rendering waits until the
  outermost block exits, so a batch of changes produces one diff per address space.
* Re-rendering diffs the old and new flat views of each address space and notifies its
  memory listeners: ``region_del`` for vanished sections first, then ``region_add`` for new
  ones, each in address order. Listener failures are collected and raised after every
  listener was told, as one :class:`TopologyError`.
* *Mapping observers* learn which RAM regions appeared in, or vanished from, the union of
  the system's live flat views: after the memory listeners of every space were notified,
  and also when an address space is created or destroyed. Nothing is computed while the
  system has no mapping observer.
* *RAM-region observers* (:class:`RamRegionObserver`) hear of every RAM region created in
  the system and of every change of a RAM region's discard manager. This is how layers
  above the memory model (the RAM-block registry) learn of RAM blocks without the memory
  model knowing them. The system holds these observers weakly: an observer that is
  collected simply stops hearing.
* Observers of both kinds run with the topology lock held and must not raise.

Theory of operation: :func:`default_system` is the process's default context; a region
created without ``system=`` joins it, which keeps single-machine code (and the README's
example) free of any context argument. A machine that must stay independent creates its
own :class:`MemorySystem` and passes it to the regions it builds; everything attached to
those regions (managers, consumers, the registry) takes the lock, policy and registry from
the region's system unless it is given one explicitly.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, TypeVar

from ramdiscard.errors import ListenerFailure


class RegionHandle(Protocol):
    """A region as its system sees it: something to record and hand to observers
    (:class:`~ramdiscard.memory.region.MemoryRegion` is the one kind there is)."""

    @property
    def name(self) -> str: ...


class SectionHandle(Protocol):
    """A flat-view section as the system sees it: the region it shows."""

    @property
    def mr(self) -> RegionHandle: ...


class LiveSpace(Protocol):
    """An address space as its system sees it
    (:class:`~ramdiscard.memory.address_space.AddressSpace` is the one kind there is)."""

    @property
    def name(self) -> str: ...

    @property
    def serial(self) -> int: ...

    def flatview(self) -> Sequence[SectionHandle]:
        """The current flat view, in address order."""
        ...

    def maps(self, mr: RegionHandle) -> bool:
        """True if ``mr`` appears in the current flat view."""
        ...

    def update_topology(self) -> list[Exception]:
        """Re-render and notify the space's listeners; returns their failures."""
        ...


MappingObserver = Callable[[list[RegionHandle], list[RegionHandle]], None]
"""Called as ``observer(appeared, vanished)`` with the topology lock held; must not raise."""

T = TypeVar("T")

_serials = itertools.count()


class RamRegionObserver(Protocol):
    """Told about the RAM regions of one system; see the module rules."""

    def ram_region_created(self, mr: RegionHandle) -> None:
        """``mr`` was just created in the system (it is not mapped yet)."""

    def ram_manager_changed(self, mr: RegionHandle) -> None:
        """``mr``'s discard manager was set or cleared (the region is unmapped)."""


class TopologyError(ListenerFailure):
    """One or more memory listeners raised while a topology change was applied.

    The new topology is in place regardless and every other listener was notified; the
    listener failures are chained as the cause.
    """


class MemorySystem:
    """One memory context: see the module rules. ``name`` only labels it."""

    def __init__(self, name: str = "memory") -> None:
        self.name = name
        self.serial = next(_serials)
        self.lock = threading.RLock()
        self._depth = 0
        self._pending = False
        self._spaces: weakref.WeakSet[LiveSpace] = weakref.WeakSet()
        self._mapping_observers: list[MappingObserver] = []
        self._ram_regions: dict[int, weakref.ref[RegionHandle]] = {}
        self._ram_observers: list[weakref.ref[RamRegionObserver]] = []
        self._components: dict[type, object] = {}

    def __repr__(self) -> str:
        return f"<MemorySystem {self.name!r}>"

    # -- components -------------------------------------------------------------------

    def component(self, kind: type[T], factory: Callable[[], T] | None = None) -> T:
        """The system's one instance of ``kind``, made by ``factory`` (default ``kind()``)
        on first use; later calls return the same instance whatever ``factory`` is."""
        with self.lock:
            existing = self._components.get(kind)
            if existing is None:
                existing = factory() if factory is not None else kind()
                self._components[kind] = existing
            assert isinstance(existing, kind)
            return existing

    # -- transactions -----------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Batch topology changes: listeners are notified once, when the outermost block
        exits. The commit happens even when the block raises, so the flat views always
        match the region tree."""
        with self.lock:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._pending:
                    self._commit()

    def in_transaction(self) -> bool:
        return self._depth > 0

    def changed(self) -> None:
        """Record a topology change; re-render now unless a transaction is open."""
        with self.lock:
            if self._depth:
                self._pending = True
                return
            self._commit()

    def _commit(self) -> None:
        self._pending = False
        errors: list[Exception] = []
        with self.watch_mapping():
            for space in self.live_spaces():
                errors.extend(space.update_topology())
        if len(errors) == 1:
            raise TopologyError("a memory listener failed during a topology update") from errors[0]
        if errors:
            raise TopologyError(
                f"{len(errors)} memory listeners failed during a topology update"
            ) from ExceptionGroup("listener failures", errors)

    # -- address spaces ---------------------------------------------------------------

    def register_space(self, space: LiveSpace) -> None:
        with self.lock:
            self._spaces.add(space)

    def unregister_space(self, space: LiveSpace) -> None:
        with self.lock:
            self._spaces.discard(space)

    def live_spaces(self) -> list[LiveSpace]:
        """The system's live address spaces, oldest first."""
        with self.lock:
            return sorted(self._spaces, key=lambda s: s.serial)

    # -- mapping observers --------------------------------------------------------------

    def add_mapping_observer(self, observer: MappingObserver) -> None:
        """Install ``observer`` (see the module rules); installing one twice is a no-op."""
        with self.lock:
            if observer not in self._mapping_observers:
                self._mapping_observers.append(observer)

    def remove_mapping_observer(self, observer: MappingObserver) -> None:
        """Remove ``observer``; unknown observers are ignored."""
        with self.lock:
            if observer in self._mapping_observers:
                self._mapping_observers.remove(observer)

    def mapped_regions(self) -> dict[int, RegionHandle]:
        """Every region in some live flat view of this system, keyed by ``id``."""
        with self.lock:
            return {id(s.mr): s.mr for space in self.live_spaces() for s in space.flatview()}

    @contextmanager
    def watch_mapping(self) -> Iterator[None]:
        """Tell the mapping observers what the block changed in :meth:`mapped_regions`,
        even if the block raises (the topology it leaves behind is what the views show)."""
        with self.lock:
            if not self._mapping_observers:
                yield
                return
            before = self.mapped_regions()
            try:
                yield
            finally:
                after = self.mapped_regions()
                vanished = [mr for key, mr in before.items() if key not in after]
                appeared = [mr for key, mr in after.items() if key not in before]
                if vanished or appeared:
                    for observer in list(self._mapping_observers):
                        observer(appeared, vanished)

    # -- RAM regions and their observers ------------------------------------------------

    def ram_regions(self) -> list[RegionHandle]:
        """The live RAM regions created in this system, oldest first."""
        with self.lock:
            alive = (ref() for ref in list(self._ram_regions.values()))
            return [mr for mr in alive if mr is not None]

    def add_ram_observer(self, observer: RamRegionObserver) -> None:
        """Install ``observer`` (held weakly); installing one twice is a no-op."""
        with self.lock:
            if not any(ref() is observer for ref in self._ram_observers):
                self._ram_observers.append(weakref.ref(observer))

    def remove_ram_observer(self, observer: RamRegionObserver) -> None:
        """Remove ``observer``; unknown observers are ignored."""
        with self.lock:
            self._ram_observers = [r for r in self._ram_observers if r() not in (None, observer)]

    def ram_region_created(self, mr: RegionHandle) -> None:
        """Hook for ``MemoryRegion.new_ram``: record ``mr`` and tell the observers."""
        with self.lock:
            key = id(mr)
            self._ram_regions[key] = weakref.ref(mr, lambda ref: self._forget(key, ref))
            for observer in self._observers():
                observer.ram_region_created(mr)

    def ram_manager_changed(self, mr: RegionHandle) -> None:
        """Hook for ``MemoryRegion.set_ram_discard_manager``, after the change."""
        with self.lock:
            for observer in self._observers():
                observer.ram_manager_changed(mr)

    def _observers(self) -> list[RamRegionObserver]:
        alive = [(ref, ref()) for ref in self._ram_observers]
        self._ram_observers = [ref for ref, obs in alive if obs is not None]
        return [obs for _, obs in alive if obs is not None]

    def _forget(self, key: int, ref: weakref.ref[RegionHandle]) -> None:
        # Runs inside the garbage collector: no lock.
        if self._ram_regions.get(key) is ref:
            del self._ram_regions[key]


_default = MemorySystem("default")


def default_system() -> MemorySystem:
    """The process's default context: regions created without ``system=`` join it."""
    return _default
