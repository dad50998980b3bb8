"""RamDiscardListener: what a consumer of populated/discarded state implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ramdiscard.memory.section import MemoryRegionSection


class ListenerHome(Protocol):
    """The side of a manager a registered listener sees through :attr:`~RamDiscardListener.manager`
    (:class:`~ramdiscard.rdm.manager.RamDiscardManager` is one)."""

    def unregister_listener(self, listener: RamDiscardListener) -> None:
        """Tell ``listener`` a discard for everything populated in its section, unlink it."""
        ...


class RamDiscardListener:
    """Subclass and override :meth:`notify_populate` and :meth:`notify_discard`.

    Contract with the manager:

    * ``notify_populate(section)`` arrives *before* the guest may use the memory. Raise to
      refuse; the manager then rolls back every listener notified before this one and
      re-raises (last-in first-out). A refusing listener must itself undo any partial work for
      ``section``.
    * ``notify_discard(section)`` arrives *after* the memory was discarded; it must not fail
      and must drop every reference (mapping, pin) to that memory. One that raises anyway
      does not keep other listeners from being told (see :mod:`ramdiscard.rdm.notify`).
    * ``double_discard_supported``: if True the listener accepts discards that cover memory
      it never saw populated, so managers may send one discard for a whole section.
    * ``section`` is the registered section, set by the manager; None while unregistered.

    Notifications are aligned to the manager's granularity in region offsets, except where
    clipped to ``section``. A listener may call the manager's query methods
    (``is_populated``, ``replay_*``, ``get_min_granularity``) from a notification, but not
    change state, register or unregister listeners on the same manager.
    """

    double_discard_supported: bool = False
    section: MemoryRegionSection | None = None
    _rdm: ListenerHome | None = None

    def notify_populate(self, section: MemoryRegionSection) -> None:
        """Memory in ``section`` is about to become usable. Raise to refuse."""

    def notify_discard(self, section: MemoryRegionSection) -> None:
        """Memory in ``section`` was discarded."""

    @property
    def manager(self) -> ListenerHome | None:
        """The manager this listener is registered with, or None."""
        return self._rdm
