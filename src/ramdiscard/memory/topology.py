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
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ramdiscard.errors import RamDiscardError

if TYPE_CHECKING:
    from ramdiscard.memory.address_space import AddressSpace

lock = threading.RLock()
_depth = 0
_pending = False
_spaces: weakref.WeakSet[AddressSpace] = weakref.WeakSet()


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


class TopologyError(RamDiscardError):
    """One or more memory listeners raised while a topology change was applied.

    The new topology is in place regardless and every other listener was notified; the
    listener failures are chained as the cause.
    """
