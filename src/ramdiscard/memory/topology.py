"""Topology changes and memory transactions of the default memory system.

Rules:

* Topology state (lock, transactions, live address spaces, mapping observers) belongs to a
  :class:`~ramdiscard.memory.system.MemorySystem`; see that module for the rules.
* The functions here act on :func:`~ramdiscard.memory.system.default_system`, the context
  of every region created without ``system=``. Code that may run in another system uses
  ``region.system`` (or ``space.system``) instead.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

from ramdiscard.memory.system import LiveSpace, MappingObserver, RegionHandle, TopologyError, default_system

__all__ = [
    "MappingObserver",
    "TopologyError",
    "add_mapping_observer",
    "in_transaction",
    "live_spaces",
    "lock",
    "mapped_regions",
    "remove_mapping_observer",
    "transaction",
    "watch_mapping",
]

lock = default_system().lock
"""The default system's topology lock."""


def transaction() -> AbstractContextManager[None]:
    """Batch topology changes of the default system (see ``MemorySystem.transaction``)."""
    return default_system().transaction()


def in_transaction() -> bool:
    return default_system().in_transaction()


def add_mapping_observer(observer: MappingObserver) -> None:
    default_system().add_mapping_observer(observer)


def remove_mapping_observer(observer: MappingObserver) -> None:
    default_system().remove_mapping_observer(observer)


def mapped_regions() -> dict[int, RegionHandle]:
    return default_system().mapped_regions()


def watch_mapping() -> AbstractContextManager[None]:
    return default_system().watch_mapping()


def live_spaces() -> list[LiveSpace]:
    return default_system().live_spaces()
