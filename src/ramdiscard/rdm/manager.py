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
* State changes notify in list order. A populate that a listener refuses is rolled back:
  every listener notified before it gets ``notify_discard`` for the same range, the
  refusing listener cleans up itself, later listeners were never told, and the error
  propagates to the provider, which then leaves its state unchanged.

Theory of operation: a provider subclasses :class:`RamDiscardManager`, implements the
four query methods over its own state, and calls :meth:`_notify_populate` /
:meth:`_notify_discard` around its state changes (populate *before* setting state,
discard *after* the memory is gone). Registration, unregistration, clipping and rollback
live here once.

Aggregation (the 2026 "RamDiscardSource" proposal): a provider may be attached to a
:class:`NotificationSink` (an aggregate manager owning several sources of one region).
While attached, the provider's ``_notify_*`` calls are forwarded to the sink, which decides
what its own listeners see; the provider accepts no listeners of its own and shares the
sink's lock, so one lock serializes the provider, its sibling sources and the sink's
listeners. Detached (the default), nothing changes.

Concurrency: every public method takes the manager's re-entrant lock, so state changes and
their notifications are serialized per manager. A listener runs with that lock held: it
may query the manager, but a state change, register or unregister on the same manager
from inside a notification raises ListenerError (it would corrupt the walk in progress),
and blocking on another thread that needs this manager deadlocks.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Protocol

from ramdiscard.errors import InvalidArgument, ListenerError
from ramdiscard.rdm.listener import RamDiscardListener

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.memory.section import MemoryRegionSection

ReplayFn = Callable[["MemoryRegionSection"], object]
"""Replay callback: called with each run; its return value is ignored, raising stops."""


class NotificationSink(Protocol):
    """Where an attached provider's notifications go (an aggregate manager).

    ``source_populate`` is called before ``source`` records ``[offset, offset+size)`` as
    populated and raises (after rolling back whatever it told its listeners) to refuse;
    ``source_discard`` after the memory is gone and before ``source`` records it;
    ``source_discard_all`` for an everything-to-discarded change with the provider's
    populated runs ``(offset, size)``.
    """

    @property
    def lock(self) -> threading.RLock: ...

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
        self._listeners: list[RamDiscardListener] = []
        self._lock = threading.RLock()
        self._notifying_thread: int | None = None
        self._sink: NotificationSink | None = None

    @property
    def region(self) -> MemoryRegion:
        """The RAM region this manager answers for."""
        return self._region

    @property
    def lock(self) -> threading.RLock:
        """The manager's lock; hold it to make several queries atomic."""
        return self._lock

    @property
    def listeners(self) -> tuple[RamDiscardListener, ...]:
        """Registered listeners, newest first."""
        with self._lock:
            return tuple(self._listeners)

    @property
    def sink(self) -> NotificationSink | None:
        """The aggregate this provider reports to, or None when it is standalone."""
        return self._sink

    def _attach_sink(self, sink: NotificationSink) -> None:
        """Forward notifications to ``sink`` and share its lock. Caller holds ``sink.lock``
        and has checked that this provider is detached and has no listeners."""
        with self._lock:
            assert self._sink is None and not self._listeners
            self._sink = sink
            self._lock = sink.lock

    def _detach_sink(self) -> None:
        """Stand alone again, with a lock of its own. Caller holds the sink's lock."""
        self._sink = None
        self._lock = threading.RLock()

    def notifying_in_current_thread(self) -> bool:
        """True while this thread is inside one of this manager's notifications."""
        return self._notifying_thread == threading.get_ident()

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
            listener.section = section
            listener._rdm = self
            self._listeners.insert(0, listener)
            replayed: list[MemoryRegionSection] = []

            def populate(run: MemoryRegionSection) -> None:
                listener.notify_populate(run)
                replayed.append(run)

            try:
                with self._notifying():
                    self.replay_populated(section, populate)
            except BaseException:
                with self._notifying():
                    for run in reversed(replayed):
                        _discard_quietly(listener, run)
                self._listeners.remove(listener)
                listener.section = None
                listener._rdm = None
                raise

    def unregister_listener(self, listener: RamDiscardListener) -> None:
        """Discard everything populated in the listener's section to it, then unlink it.

        Raises ListenerError if ``listener`` is not registered with this manager.
        """
        with self._lock:
            self._check_not_notifying("unregister a listener")
            if listener._rdm is not self or listener.section is None:
                raise ListenerError(f"{listener!r} is not registered with {self!r}")
            section = listener.section
            with self._notifying():
                if listener.double_discard_supported:
                    if self._any_populated(section):
                        listener.notify_discard(section)
                else:
                    runs: list[MemoryRegionSection] = []
                    self.replay_populated(section, runs.append)
                    for run in runs:
                        listener.notify_discard(run)
            self._listeners.remove(listener)
            listener.section = None
            listener._rdm = None

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

    def _any_populated(self, section: MemoryRegionSection) -> bool:
        found = False

        def stop(_: MemoryRegionSection) -> None:
            nonlocal found
            found = True
            raise _StopReplay

        with suppress(_StopReplay):
            self.replay_populated(section, stop)
        return found

    def _check_not_notifying(self, what: str) -> None:
        if self.notifying_in_current_thread() or (
            self._sink is not None and self._sink.notifying_in_current_thread()
        ):
            raise ListenerError(f"cannot {what} on {self!r} from inside one of its notifications")

    @contextmanager
    def _notifying(self) -> Iterator[None]:
        outer = self._notifying_thread
        self._notifying_thread = threading.get_ident()
        try:
            yield
        finally:
            self._notifying_thread = outer

    def _notify_populate(self, offset: int, size: int) -> None:
        """Tell every listener whose section intersects ``[offset, offset+size)``.

        On a refusal, listeners notified before the refusing one get ``notify_discard`` for
        their intersection, and the refusal propagates. Call with the lock held, before
        the provider records the range as populated. Forwarded to the sink when attached.
        """
        if self._sink is not None:
            self._sink.source_populate(self, offset, size)
            return
        notified: list[tuple[RamDiscardListener, MemoryRegionSection]] = []
        with self._notifying():
            for listener in self._listeners:
                assert listener.section is not None
                part = listener.section.intersect(offset, size)
                if part is None:
                    continue
                try:
                    listener.notify_populate(part)
                except BaseException:
                    for earlier, earlier_part in reversed(notified):
                        _discard_quietly(earlier, earlier_part)
                    raise
                notified.append((listener, part))

    def _notify_discard(self, offset: int, size: int) -> None:
        """Tell every listener whose section intersects the range that it was discarded.

        Call with the lock held, after the memory is discarded and before the provider
        records the range as discarded. Only send ranges that are populated, unless every
        listener supports double discard. Forwarded to the sink when attached.
        """
        if self._sink is not None:
            self._sink.source_discard(self, offset, size)
            return
        with self._notifying():
            for listener in self._listeners:
                assert listener.section is not None
                part = listener.section.intersect(offset, size)
                if part is not None:
                    listener.notify_discard(part)

    def _notify_discard_all(self, populated_runs: list[tuple[int, int]]) -> None:
        """Discard everything: one whole-section discard to double-discard listeners, one
        per populated run (region offset, size) to the others. Call before clearing state.
        Forwarded to the sink when attached."""
        if self._sink is not None:
            self._sink.source_discard_all(self, populated_runs)
            return
        with self._notifying():
            for listener in self._listeners:
                assert listener.section is not None
                if listener.double_discard_supported:
                    listener.notify_discard(listener.section)
                    continue
                for offset, size in populated_runs:
                    part = listener.section.intersect(offset, size)
                    if part is not None:
                        listener.notify_discard(part)


class _StopReplay(Exception):
    pass


def _discard_quietly(listener: RamDiscardListener, section: MemoryRegionSection) -> None:
    """Roll back one listener; a discard must not fail, and one that does must not stop
    the rollback of the others."""
    try:
        listener.notify_discard(section)
    except Exception:
        import logging

        logging.getLogger("ramdiscard.rdm").exception(
            "listener %r raised from notify_discard during rollback of %r", listener, section
        )
