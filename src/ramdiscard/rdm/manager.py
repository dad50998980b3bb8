"""The RamDiscardManager contract, and the listener bookkeeping every provider shares.

Rules (QEMU's contract, with the places where this implementation is stricter marked):

* A manager manages exactly one RAM region (``region``). Every section passed to it must
  reference that region and lie inside it; otherwise InvalidArgument, nothing changes.
* ``get_min_granularity`` is a non-zero power of two; state changes happen in multiples
  of it, aligned in region offsets.
* Replays (``replay_populated`` / ``replay_discarded``) call ``fn`` once per *maximal* run,
  in ascending order, each clipped to the section; the first exception stops the replay
  and propagates. Replays never change state.
* Listeners are kept newest first. ``register_listener`` links the listener at the head
  and replays every populated run of its section as ``notify_populate``.
  *Stricter than QEMU:* if that replay is refused, the runs already notified are discarded
  again, the listener is unlinked and the error propagates (QEMU logs and keeps a half
  registered listener).
* ``unregister_listener`` sends discards for everything populated in the section: one
  whole-section discard for double-discard listeners, one per populated run otherwise.
  The listener is unlinked even if one of those discards raises.
* State changes notify in list order. A populate that a listener refuses is rolled back
  last-in first-out: every listener notified before it gets ``notify_discard`` for what
  it was told, in reverse order, the refusing listener cleans up itself, later listeners
  were never told, and the error propagates to the provider, which then leaves its state
  unchanged. A discard reaches *every* listener even when some raise; the failures are
  raised afterwards as one DiscardNotificationError and the provider records the discard
  anyway (the memory is gone). The walks themselves live in :mod:`ramdiscard.rdm.notify`.

Theory of operation: a provider subclasses :class:`RamDiscardManager`, implements the
four query methods over its own state, and calls :meth:`_notify_populate_runs` /
:meth:`_notify_discard_runs` (or their one-run forms) around its state changes (populate
*before* setting state, discard *after* the memory is gone, recording the discard even if
the notification raises). Registration, unregistration, clipping and rollback are the
notification engine's (:class:`~ramdiscard.rdm.notify.Notifier`), one per manager.

Aggregation (the 2026 "RamDiscardSource" proposal): a provider may be attached to a
:class:`NotificationSink` (an aggregate manager owning several sources of one region).
While attached, the provider's ``_notify_*`` calls are forwarded to the sink, which decides
what its own listeners see; the provider accepts no listeners of its own. Detached (the
default), nothing changes.

Concurrency: every public method takes the manager's re-entrant lock, so state changes and
their notifications are serialized per manager. The lock is the *region's* discard lock
(:func:`region_lock`): created once per RAM region and shared by every manager of that
region, so a provider, its sibling sources and their aggregate are serialized by one lock
that never changes, whether the provider stands alone, joins an aggregate or leaves it
(a thread waiting on it can never wake up under a stale lock). A sink must take that
same lock. A listener runs with that lock held: it
may query the manager, but a state change, register or unregister on the same manager
from inside a notification raises ListenerError (it would corrupt the walk in progress),
and blocking on another thread that needs this manager deadlocks.
"""

from __future__ import annotations

import logging
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from ramdiscard.errors import InvalidArgument, ListenerError
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.rdm.notify import DiscardNotificationError, Notifier, Run

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.memory.section import MemoryRegionSection

_log = logging.getLogger("ramdiscard.rdm")

ReplayFn = Callable[["MemoryRegionSection"], object]
"""Replay callback: called with each run; its return value is ignored, raising stops."""

_region_locks: weakref.WeakKeyDictionary[MemoryRegion, threading.RLock] = weakref.WeakKeyDictionary()
_region_locks_guard = threading.Lock()


def region_lock(region: MemoryRegion) -> threading.RLock:
    """The discard lock of ``region``: one re-entrant lock per region for its whole life,
    shared by every RamDiscardManager of the region (providers and their aggregate)."""
    with _region_locks_guard:
        lock = _region_locks.get(region)
        if lock is None:
            lock = _region_locks[region] = threading.RLock()
        return lock


class NotificationSink(Protocol):
    """Where an attached provider's notifications go (an aggregate manager).

    ``source_populate`` is called before ``source`` records ``[offset, offset+size)`` as
    populated and raises (after rolling back whatever it told its listeners) to refuse;
    ``source_discard`` after the memory is gone and before ``source`` records it;
    ``source_discard_all`` for an everything-to-discarded change with the provider's
    populated runs ``(offset, size)``.
    """

    @property
    def lock(self) -> threading.RLock:
        """Must be the region's :func:`region_lock`."""
        ...

    def source_populate(self, source: object, offset: int, size: int) -> None: ...

    def source_discard(self, source: object, offset: int, size: int) -> None: ...

    def source_discard_all(self, source: object, runs: list[tuple[int, int]]) -> None: ...

    def notifying_in_current_thread(self) -> bool: ...


class RamDiscardManager(ABC):
    """Abstract provider of populated/discarded state for one RAM region."""

    def __init__(self, region: MemoryRegion) -> None:
        if not region.is_ram:
            raise InvalidArgument(f"{region.name!r} is not a RAM region")
        self._region = region
        self._notifier = Notifier()
        self._lock = region_lock(region)
        self._sink: NotificationSink | None = None

    @property
    def region(self) -> MemoryRegion:
        """The RAM region this manager answers for."""
        return self._region

    @property
    def lock(self) -> threading.RLock:
        """The manager's lock (the region's discard lock, never replaced); hold it to make
        several queries atomic."""
        return self._lock

    @property
    def listeners(self) -> tuple[RamDiscardListener, ...]:
        """Registered listeners, newest first."""
        with self._lock:
            return self._notifier.listeners

    @property
    def sink(self) -> NotificationSink | None:
        """The aggregate this provider reports to, or None when it is standalone."""
        return self._sink

    def _attach_sink(self, sink: NotificationSink) -> None:
        """Forward notifications to ``sink``. Caller holds the lock and has checked that
        this provider is detached and has no listeners; the sink shares the lock."""
        with self._lock:
            assert self._sink is None and not self._notifier
            assert sink.lock is self._lock, "a sink must use the region's discard lock"
            self._sink = sink

    def _detach_sink(self) -> None:
        """Stand alone again (same lock). Caller holds the lock."""
        self._sink = None

    def notifying_in_current_thread(self) -> bool:
        """True while this thread is inside one of this manager's notifications."""
        return self._notifier.active_in_current_thread()

    # -- queries (providers implement) -------------------------------------------------

    @abstractmethod
    def get_min_granularity(self, mr: MemoryRegion) -> int:
        """Smallest unit of state change, a power of two. ``mr`` must be :attr:`region`."""

    @abstractmethod
    def is_populated(self, section: MemoryRegionSection) -> bool:
        """True only if every byte of ``section`` is populated."""

    @abstractmethod
    def replay_populated(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        """Call ``fn`` for each maximal populated run in ``section``, ascending, clipped."""

    @abstractmethod
    def replay_discarded(self, section: MemoryRegionSection, fn: ReplayFn) -> None:
        """Call ``fn`` for each maximal discarded run in ``section``, ascending, clipped."""

    # -- listeners ------------------------------------------------------------------

    def register_listener(self, listener: RamDiscardListener, section: MemoryRegionSection) -> None:
        """Register ``listener`` for ``section`` and replay populated runs to it.

        Raises InvalidArgument for a section of another region or out of range,
        ListenerError if the listener is registered anywhere already. If the listener
        refuses a replayed populate, what it was told is discarded again, it stays
        unregistered, and its exception propagates.
        """
        with self._lock:
            self._check_not_notifying("register a listener")
            if self._sink is not None:
                raise ListenerError(
                    f"{self!r} is a source of {self._sink!r}; register listeners with the region's manager"
                )
            self.check_section(section)
            if section.size == 0:
                raise InvalidArgument(f"cannot register a listener for empty {section!r}")
            if listener._rdm is not None:
                raise ListenerError(f"{listener!r} is already registered with {listener._rdm!r}")
            listener._rdm = self
            self._notifier.register(listener, section, self.replay_populated)

    def unregister_listener(self, listener: RamDiscardListener) -> None:
        """Discard everything populated in the listener's section to it, then unlink it.

        Raises ListenerError if ``listener`` is not registered with this manager, and
        DiscardNotificationError (after unlinking it) if it raised from a discard.
        """
        with self._lock:
            self._check_not_notifying("unregister a listener")
            if listener._rdm is not self or listener.section is None:
                raise ListenerError(f"{listener!r} is not registered with {self!r}")
            self._notifier.unregister(listener, self.replay_populated)

    # -- helpers for providers --------------------------------------------------------

    def check_section(self, section: MemoryRegionSection) -> None:
        """Raise InvalidArgument unless ``section`` is inside :attr:`region`."""
        if section.mr is not self._region:
            raise InvalidArgument(
                f"{section!r} is not a section of {self._region.name!r}, managed by {self!r}"
            )
        if section.end > self._region.size:
            raise InvalidArgument(
                f"{section!r} extends beyond {self._region.name!r} (size {self._region.size:#x})"
            )

    def check_region(self, mr: MemoryRegion) -> None:
        if mr is not self._region:
            raise InvalidArgument(f"{self!r} manages {self._region.name!r}, not {mr.name!r}")

    def _check_not_notifying(self, what: str) -> None:
        if self.notifying_in_current_thread() or (
            self._sink is not None and self._sink.notifying_in_current_thread()
        ):
            raise ListenerError(f"cannot {what} on {self!r} from inside one of its notifications")

    def _notify_populate(self, offset: int, size: int) -> None:
        """:meth:`_notify_populate_runs` for one run."""
        self._notify_populate_runs(((offset, size),))

    def _notify_populate_runs(self, runs: Sequence[Run]) -> None:
        """Tell every listener whose section intersects a run ``(offset, size)``,
        all-or-nothing: on a refusal everything told is discarded again, last-in
        first-out, and the refusal propagates. Call with the lock held, before the
        provider records the runs as populated.

        Attached to a sink, each run goes to ``sink.source_populate`` (which rolls its
        own listeners back); if a later run is refused, the earlier runs are discarded
        again through ``sink.source_discard`` in reverse run order.
        """
        sink = self._sink
        if sink is None:
            self._notifier.populate(runs)
            return
        done: list[Run] = []
        try:
            for offset, size in runs:
                sink.source_populate(self, offset, size)
                done.append((offset, size))
        except BaseException:
            for offset, size in reversed(done):
                try:
                    sink.source_discard(self, offset, size)
                except Exception:
                    _log.exception("%r: rolling back [%#x, +%#x) through %r failed", self, offset, size, sink)
            raise

    def _notify_discard(self, offset: int, size: int) -> None:
        """:meth:`_notify_discard_runs` for one run."""
        self._notify_discard_runs(((offset, size),))

    def _notify_discard_runs(self, runs: Sequence[Run]) -> None:
        """Tell every listener whose section intersects a run that it was discarded; every
        listener hears of every run even if some raise, then the failures are raised as
        one DiscardNotificationError. Call with the lock held, after the memory is
        discarded; record the discard whether or not this raises. Only send ranges that
        are populated, unless every listener supports double discard. Forwarded to the
        sink when attached."""
        sink = self._sink
        if sink is None:
            self._notifier.discard(runs)
            return
        errors: list[Exception] = []
        for offset, size in runs:
            try:
                sink.source_discard(self, offset, size)
            except DiscardNotificationError as exc:
                errors.extend(exc.exceptions)
            except Exception as exc:  # every run must still reach the sink
                errors.append(exc)
        if errors:
            raise DiscardNotificationError(f"{len(errors)} discard notification(s) failed", errors)

    def _notify_discard_all(self, populated_runs: list[tuple[int, int]]) -> None:
        """Discard everything: one whole-section discard to double-discard listeners, one
        per populated run (region offset, size) to the others; every listener is told even
        if some raise (failures raised afterwards). Call before clearing state, and clear
        it whether or not this raises. Forwarded to the sink when attached."""
        if self._sink is not None:
            self._sink.source_discard_all(self, populated_runs)
            return
        self._notifier.discard_all(populated_runs)


def manager_of(mr: MemoryRegion) -> RamDiscardManager | None:
    """``mr``'s discard manager with the full contract (listeners included), or None.

    The memory model types the slot by the query protocol it needs; a manager set there
    that is not a :class:`RamDiscardManager` raises InvalidArgument here.
    """
    rdm = mr.ram_discard_manager
    if rdm is None or isinstance(rdm, RamDiscardManager):
        return rdm
    raise InvalidArgument(f"{mr.name!r}: manager {rdm!r} is not a RamDiscardManager")
