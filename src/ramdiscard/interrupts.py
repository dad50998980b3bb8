"""SIGINT/SIGTERM as KeyboardInterrupt, held off while resources are being released.

* :func:`install` (called by the ``ramdiscard`` command) makes SIGINT and SIGTERM raise
  :class:`KeyboardInterrupt` in the main thread, so every ``finally`` runs.
* :func:`deferred` marks a critical section (releasing pins, mappings, files): a signal
  arriving inside it, in any thread, is only recorded; when the outermost section ends the
  interrupt is raised then, once, however many signals came. A cleanup is therefore never
  left half-way by a second signal. The handler runs only in the main thread (Python's
  rule), so sections entered from other threads need no care; they are counted all the
  same, so a signal arriving while another thread releases is held until it is done.
* One interrupt per run (with :func:`install`): once a signal has raised
  KeyboardInterrupt (from the handler or at the end of a section), later signals are only
  recorded until :func:`install`'s restore. The interrupt is already unwinding through
  every ``finally``; a second one landing between two sections (the 10 ms between two
  SIGTERMs) would otherwise skip the cleanup still to come.
* Without :func:`install` (library use), :func:`deferred` still holds off Python's default
  SIGINT handler: it installs the deferring handler for the section when it can (main
  thread) and restores the previous one afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_state_lock = threading.Lock()
_depth = 0
_pending: int | None = None
_interrupting = False
_installed = False


def _handler(signum: int, frame: FrameType | None) -> None:
    global _pending, _interrupting
    if _depth > 0 or _interrupting:
        _pending = signum
        return
    _interrupting = _installed
    raise KeyboardInterrupt(f"signal {signum}")


def install() -> Callable[[], None]:
    """Route SIGINT and SIGTERM to the deferring handler; returns a function restoring the
    previous handlers. Main thread only."""
    global _interrupting, _pending, _installed
    _interrupting, _pending, _installed = False, None, True
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}

    def restore() -> None:
        global _interrupting, _pending, _installed
        for s, h in previous.items():
            signal.signal(s, h)
        _interrupting, _pending, _installed = False, None, False

    return restore


def pending() -> int | None:
    """The signal held off by the current sections, if any."""
    return _pending


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A section that SIGINT/SIGTERM cannot interrupt (see the module rules). On leaving
    the outermost section a held signal raises KeyboardInterrupt, unless an exception is
    already propagating (the interrupt is then already under way)."""
    global _depth, _pending, _interrupting
    with _state_lock:
        _depth += 1
    swapped: dict[signal.Signals, Any] = {}
    failed = True
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is signal.default_int_handler:
                    swapped[sig] = signal.signal(sig, _handler)
        yield
        failed = False
    finally:
        for sig, h in swapped.items():
            signal.signal(sig, h)
        with _state_lock:
            _depth -= 1
            held = _pending if _depth == 0 else None
            if held is not None:
                _pending = None
            raise_now = held is not None and not failed and not _interrupting
            if raise_now:
                _interrupting = _installed
        if raise_now:
            raise KeyboardInterrupt(f"signal {held} (held off while releasing)")


__all__ = ["SIGNALS", "deferred", "install", "pending"]
