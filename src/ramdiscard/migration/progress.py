"""Progress of a migration, snapshot or restore, reported through a callback.

The callback gets a :class:`Progress` after each page chunk, at most every
``interval`` seconds, and always once at the end (``finished`` True). A callback that
raises aborts the transfer (that is how a CLI cancels one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

PAGE = 4096
"""Pages are counted in 4 KiB target pages, as QEMU's migration statistics do."""


@dataclass(frozen=True, slots=True)
class Progress:
    phase: str
    """"send", "receive", "snapshot" or "restore"."""
    bytes_done: int
    """Page bytes transferred so far."""
    bytes_total: int
    """Page bytes to transfer (the populated size; unknown to a receiver before END: 0)."""
    stream_bytes: int
    """Bytes of the stream itself (headers included)."""
    elapsed: float

    @property
    def pages_done(self) -> int:
        return self.bytes_done // PAGE

    @property
    def pages_total(self) -> int:
        return self.bytes_total // PAGE

    @property
    def rate(self) -> float:
        """Page bytes per second so far."""
        return self.bytes_done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def finished(self) -> bool:
        return self.bytes_total > 0 and self.bytes_done >= self.bytes_total


ProgressFn = Callable[[Progress], None]


class ProgressTracker:
    """Accumulates counts and calls ``fn`` (if any) at most every ``interval`` seconds."""

    def __init__(self, phase: str, total: int, fn: ProgressFn | None, interval: float = 0.1) -> None:
        self.phase = phase
        self.total = total
        self.fn = fn
        self.interval = interval
        self.bytes_done = 0
        self.stream_bytes = 0
        self.start = time.perf_counter()
        self._last = 0.0

    def stream(self, n: int) -> None:
        self.stream_bytes += n

    def pages(self, n: int) -> None:
        self.bytes_done += n
        if self.fn is not None:
            now = time.perf_counter()
            if now - self._last >= self.interval:
                self._last = now
                self.fn(self.snapshot(now))

    def snapshot(self, now: float | None = None) -> Progress:
        now = time.perf_counter() if now is None else now
        return Progress(self.phase, self.bytes_done, self.total, self.stream_bytes, now - self.start)

    def finish(self) -> Progress:
        if not self.total:
            self.total = self.bytes_done
        final = self.snapshot()
        if self.fn is not None:
            self.fn(final)
        return final
