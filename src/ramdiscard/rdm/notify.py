"""The notification engine: the one place that walks RamDiscardListeners.

Rules (every provider, the aggregate and state restore go through these):

* Listeners are kept newest first; every walk visits them in that order, and for a
  change of several runs it is run-major (every listener hears run 1, then run 2, ...),
  except a discard-all, which is listener-major (see :meth:`Notifier.discard_all`).
  Each listener is told only the part of a run that intersects its registered section.
* **Populate is all-or-nothing.** The engine journals every (listener, part) it told. A
  refusal (any exception from ``notify_populate``) rolls the journal back last-in
  first-out: the listener told last gets ``notify_discard`` first, so listeners are
  rolled back in reverse order and, within one listener, runs in reverse. The refusing
  listener is not told about the part it refused (it cleans up itself) but is rolled back
  for parts it accepted earlier in the same change. The rollback reaches every journaled
  entry even if some of those discards raise (those are logged); then the refusal
  propagates unchanged and the provider keeps its old state.
* **Discard reaches everyone.** A discard is delivered to *every* listener for *every*
  run, whatever some of them raise: the memory is already gone, so stopping would leave a
  later listener with pins or mappings on discarded memory. After the walk the failures
  are raised together as one :class:`DiscardNotificationError` (an ExceptionGroup that is
  also a ListenerFailure). A failure that is not an ``Exception`` (KeyboardInterrupt,
  SystemExit) is re-raised as itself after the walk, the others logged. The provider
  records the discard whether or not this raises.
* **Discard or undo** (for changes that may still be refused, such as adding a source to
  an aggregate): the discard is delivered to everyone as above; if anyone failed, every
  entry that *was* discarded is re-populated, last-in first-out (re-populate refusals are
  logged), and the DiscardNotificationError propagates, so nothing changed.
* **Register with replay**: the listener is linked at the head and told every populated
  run of its section (the provider's replay). If it refuses, the runs it accepted are
  discarded again in reverse order, it is unlinked and the refusal propagates.
* **Unregister**: the listener is told a discard for everything populated in its section
  (one whole-section discard when it supports double discard and anything is populated,
  one per populated run otherwise), then it is unlinked even if some of those discards
  raised; the failures are then raised as a DiscardNotificationError.
* While the engine is delivering, it remembers the delivering thread, so providers can
  refuse re-entrant state changes (``active_in_current_thread``).

Theory of operation: a :class:`Notifier` is owned by one manager and holds that manager's
listener list. It knows nothing about provider state: callers give it the runs to
announce as ``(region offset, size)`` pairs and, for replay, the provider's replay method.
It takes no lock; the owning manager calls it with its lock held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from threading import get_ident
from typing import TYPE_CHECKING

from ramdiscard.errors import ListenerFailure
from ramdiscard.rdm.listener import RamDiscardListener

if TYPE_CHECKING:
    from ramdiscard.memory.section import MemoryRegionSection

_log = logging.getLogger("ramdiscard.rdm")

Run = tuple[int, int]
"""A range to announce: (region offset, size)."""

ReplayInto = Callable[["MemoryRegionSection", Callable[["MemoryRegionSection"], object]], None]
"""A provider's ``replay_populated``."""

Told = list[tuple[RamDiscardListener, "MemoryRegionSection"]]


class DiscardNotificationError(ExceptionGroup[Exception], ListenerFailure):
    """One or more listeners raised from ``notify_discard``; every listener was still told.

    ``exceptions`` holds what the listeners raised, in delivery order; ``failures`` pairs
    each with its listener and the section it was told. (``split``/``subgroup`` return
    plain ExceptionGroups.)
    """

    failures: tuple[tuple[RamDiscardListener, MemoryRegionSection, Exception], ...] = ()


class Notifier:
    """The listeners of one manager and every walk over them; see the module rules."""

    def __init__(self) -> None:
        self._listeners: list[RamDiscardListener] = []
        self._thread: int | None = None

    @property
    def listeners(self) -> tuple[RamDiscardListener, ...]:
        """Registered listeners, newest first."""
        return tuple(self._listeners)

    def __bool__(self) -> bool:
        return bool(self._listeners)

    def active_in_current_thread(self) -> bool:
        """True while this thread is inside one of this engine's walks."""
        thread = self._thread
        return thread is not None and thread == get_ident()

    @contextmanager
    def _delivering(self) -> Iterator[None]:
        outer = self._thread
        self._thread = get_ident()
        try:
            yield
        finally:
            self._thread = outer

    # -- state changes ------------------------------------------------------------------

    def populate(self, runs: Sequence[Run]) -> None:
        """Tell every listener about each run, all-or-nothing (LIFO rollback on refusal)."""
        listeners = self._listeners
        if not listeners:
            return
        told: Told = []
        outer = self._thread
        self._thread = get_ident()
        try:
            for offset, size in runs:
                end = offset + size
                for listener in listeners:
                    part = listener.section
                    assert part is not None
                    start = part.offset_within_region
                    # _clip() inline (the request path): a run covering the section
                    # notifies the section itself.
                    if start < offset or start + part.size > end:
                        part = part.intersect(offset, size)
                    if part is not None:
                        listener.notify_populate(part)
                        told.append((listener, part))
        except BaseException:
            _rollback_populate(told)
            raise
        finally:
            self._thread = outer

    def discard(self, runs: Sequence[Run]) -> None:
        """Tell every listener about each run; raise the collected failures afterwards."""
        listeners = self._listeners
        if not listeners:
            return
        failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]] = []
        outer = self._thread
        self._thread = get_ident()
        try:
            for offset, size in runs:
                end = offset + size
                for listener in listeners:
                    part = listener.section
                    assert part is not None
                    start = part.offset_within_region
                    if start < offset or start + part.size > end:  # _clip() inline
                        part = part.intersect(offset, size)
                    if part is not None:
                        try:
                            listener.notify_discard(part)
                        except BaseException as exc:  # collected: every listener must be told
                            failures.append((listener, part, exc))
        finally:
            self._thread = outer
        if failures:
            _raise_failures(failures, "discard")

    def discard_all(self, runs: Sequence[Run]) -> None:
        """Everything becomes discarded; ``runs`` are the populated runs before.

        Listener-major: each double-discard listener gets one discard of its whole section,
        each other listener one per run it intersects. Failures as for :meth:`discard`.
        """
        if not self._listeners:
            return
        failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]] = []
        with self._delivering():
            for listener in self._listeners:
                section = listener.section
                assert section is not None
                if listener.double_discard_supported:
                    _deliver_discard(listener, section, failures)
                    continue
                for offset, size in runs:
                    part = section.intersect(offset, size)
                    if part is not None:
                        _deliver_discard(listener, part, failures)
        _raise_failures(failures, "discard")

    def discard_or_undo(self, runs: Sequence[Run]) -> None:
        """Discard to everyone; if anyone failed, re-populate what was discarded (LIFO)
        and raise the failures, leaving every listener as it was."""
        if not self._listeners:
            return
        failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]] = []
        told: Told = []
        with self._delivering():
            for offset, size in runs:
                for listener, part in self._parts(offset, size):
                    if _deliver_discard(listener, part, failures):
                        told.append((listener, part))
            if failures:
                for listener, part in reversed(told):
                    try:
                        listener.notify_populate(part)
                    except Exception:
                        _log.exception(
                            "listener %r refused re-populate of %r during rollback", listener, part
                        )
        _raise_failures(failures, "discard")

    # -- registration -------------------------------------------------------------------

    def register(
        self, listener: RamDiscardListener, section: MemoryRegionSection, replay: ReplayInto
    ) -> None:
        """Link ``listener`` for ``section`` at the head and replay populated runs to it.

        The caller has checked the section and that the listener is unregistered, and set
        the listener's manager. On a refusal the accepted runs are discarded again (LIFO),
        the listener is unlinked (section and manager cleared) and the refusal propagates.
        """
        listener.section = section
        self._listeners.insert(0, listener)
        told: Told = []

        def populate(run: MemoryRegionSection) -> None:
            listener.notify_populate(run)
            told.append((listener, run))

        try:
            with self._delivering():
                replay(section, populate)
        except BaseException:
            with self._delivering():
                _rollback_populate(told)
            self._unlink(listener)
            raise

    def unregister(self, listener: RamDiscardListener, replay: ReplayInto) -> None:
        """Discard what is populated in the listener's section to it, then unlink it
        (also when a discard raised; the failures are raised afterwards)."""
        section = listener.section
        assert section is not None
        runs: list[MemoryRegionSection] = []
        failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]] = []
        try:
            if listener.double_discard_supported:
                with suppress(_StopReplay):
                    replay(section, _stop_at_first(runs))
                runs[:] = [section] if runs else []
            else:
                replay(section, runs.append)
            with self._delivering():
                for run in runs:
                    _deliver_discard(listener, run, failures)
        finally:
            self._unlink(listener)
        _raise_failures(failures, "discard on unregister")

    def _unlink(self, listener: RamDiscardListener) -> None:
        self._listeners.remove(listener)
        listener.section = None
        listener._rdm = None

    def _parts(self, offset: int, size: int) -> Iterable[tuple[RamDiscardListener, MemoryRegionSection]]:
        end = offset + size
        for listener in self._listeners:
            part = _clip(listener.section, offset, end)
            if part is not None:
                yield listener, part


def _clip(section: MemoryRegionSection | None, offset: int, end: int) -> MemoryRegionSection | None:
    """The part of a registered listener's ``section`` inside region range ``[offset,
    end)`` (the section itself when it lies inside), or None when they do not meet."""
    assert section is not None
    start = section.offset_within_region
    if offset <= start and start + section.size <= end:
        return section
    return section.intersect(offset, end - offset)


class _StopReplay(Exception):
    pass


def _stop_at_first(found: list[MemoryRegionSection]) -> Callable[[MemoryRegionSection], None]:
    def stop(run: MemoryRegionSection) -> None:
        found.append(run)
        raise _StopReplay

    return stop


def _rollback_populate(told: Told) -> None:
    for listener, part in reversed(told):
        try:
            listener.notify_discard(part)
        except Exception:
            _log.exception("listener %r raised from notify_discard during rollback of %r", listener, part)


def _deliver_discard(
    listener: RamDiscardListener,
    part: MemoryRegionSection,
    failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]],
) -> bool:
    try:
        listener.notify_discard(part)
    except BaseException as exc:  # collected: every other listener must still be told
        failures.append((listener, part, exc))
        return False
    return True


def _raise_failures(
    failures: list[tuple[RamDiscardListener, MemoryRegionSection, BaseException]], what: str
) -> None:
    if not failures:
        return
    fatal = [exc for _, _, exc in failures if not isinstance(exc, Exception)]
    if fatal:
        for listener, part, exc in failures:
            if exc is not fatal[0]:
                _log.error("listener %r failed %s of %r", listener, what, part, exc_info=exc)
        raise fatal[0]
    ordinary = [(listener, part, exc) for listener, part, exc in failures if isinstance(exc, Exception)]
    names = ", ".join(repr(listener) for listener, _, _ in ordinary)
    error = DiscardNotificationError(
        f"{len(ordinary)} {what} notification(s) failed ({names}); every listener was told",
        [exc for _, _, exc in ordinary],
    )
    error.failures = tuple(ordinary)
    raise error
