"""Topology changes and memory transactions.

Rules:

* All topology changes (adding, removing, enabling, disabling regions) and all address-space
  re-rendering happen under one process-wide re-entrant lock, as QEMU's do under the BQL.
* A change made outside a transaction re-renders every live address space at once. Inside
  :func:`transaction` (nestable) re-rendering waits until the outermost block exits, so a
  batch of changes produces one diff and each listener sees only the net effect.
* Re-rendering diffs the old and new flat views of each address space and notifies its
  memory listeners: ``region_del`` for vanished sections first, then ``region_add`` for new
  ones, each in address order.
* *Mapping observers* (:func:`add_mapping_observer`) learn which RAM regions appeared in,
  or vanished from, the union of all live flat views: after the memory listeners of every
  space were notified, and also when an address space is created or destroyed. They are
  told nothing about regions that stay mapped. An address space that is garbage collected
  without :meth:`~ramdiscard.memory.AddressSpace.destroy` drops out silently. Nothing is
  computed while no observer is installed.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ramdiscard.errors import ListenerFailure

if TYPE_CHECKING:
    from ramdiscard.memory.address_space import AddressSpace
    from ramdiscard.memory.region import MemoryRegion

MappingObserver = Callable[[list["MemoryRegion"], list["MemoryRegion"]], None]
"""Called as ``observer(appeared, vanished)`` with the topology lock held; must not raise."""

lock = threading.RLock()
_depth = 0
_pending = False
_spaces: weakref.WeakSet[AddressSpace] = weakref.WeakSet()
_mapping_observers: list[MappingObserver] = []


def add_mapping_observer(observer: MappingObserver) -> None:
    """Install ``observer`` (see the module rules); installing one twice is a no-op."""
    with lock:
        if observer not in _mapping_observers:
            _mapping_observers.append(observer)


def remove_mapping_observer(observer: MappingObserver) -> None:
    """Remove ``observer``; unknown observers are ignored."""
    with lock:
        if observer in _mapping_observers:
            _mapping_observers.remove(observer)


def mapped_regions() -> dict[int, MemoryRegion]:
    """Every region in some live flat view, keyed by ``id``."""
    with lock:
        return {id(s.mr): s.mr for space in live_spaces() for s in space.flatview()}


@contextmanager
def watch_mapping() -> Iterator[None]:
    """Tell the mapping observers what the block changed in :func:`mapped_regions`, even if
    the block raises (the topology it leaves behind is what the views show)."""
    with lock:
        if not _mapping_observers:
            yield
            return
        before = mapped_regions()
        try:
            yield
        finally:
            after = mapped_regions()
            vanished = [mr for key, mr in before.items() if key not in after]
            appeared = [mr for key, mr in after.items() if key not in before]
            if vanished or appeared:
                for observer in list(_mapping_observers):
                    observer(appeared, vanished)


def register_space(space: AddressSpace) -> None:
    with lock:
        _spaces.add(space)


def unregister_space(space: AddressSpace) -> None:
    with lock:
        _spaces.discard(space)


def live_spaces() -> list[AddressSpace]:
    with lock:
        return sorted(_spaces, key=lambda s: s.serial)


def changed() -> None:
    """Record a topology change; re-render now unless a transaction is open."""
    global _pending
    with lock:
        if _depth:
            _pending = True
            return
        _commit()


def _commit() -> None:
    global _pending
    _pending = False
    errors: list[Exception] = []
    with watch_mapping():
        for space in live_spaces():
            errors.extend(space._update_topology())
    if len(errors) == 1:
        raise TopologyError("a memory listener failed during a topology update") from errors[0]
    if errors:
        raise TopologyError(
            f"{len(errors)} memory listeners failed during a topology update"
        ) from ExceptionGroup("listener failures", errors)


@contextmanager
def transaction() -> Iterator[None]:
    """Batch topology changes: listeners are notified once, when the outermost block exits.

    The commit happens even when the block raises, so the flat views always match the
    region tree.
    """
    global _depth
    with lock:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0 and _pending:
                _commit()


def in_transaction() -> bool:
    return _depth > 0


class TopologyError(ListenerFailure):
    """One or more memory listeners raised while a topology change was applied.

    The new topology is in place regardless and every other listener was notified; the
    listener failures are chained as the cause.
    """
