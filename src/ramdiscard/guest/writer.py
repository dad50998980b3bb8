"""GuestWriter: a guest that keeps writing its plugged memory while the machine runs.

Rules:

* The writer is a host thread standing for the guest's vCPUs. It writes whole 4 KiB pages
  at ``rate`` bytes per second (paced in ticks of :data:`TICK` seconds; a tick that ran
  late writes what it owes, at most one second's worth), each page stamped with a
  sequence number, into the plugged memory of the given devices only.
* Pattern: ``random`` picks plugged pages uniformly; ``hot`` picks uniformly among the
  first ``hot_set`` bytes of plugged memory (in plugged order); ``sequential`` walks the
  plugged pages in order and wraps around. Each page written holds its sequence number
  (``seq_base`` + 1, + 2, ...) and its plugged-page ordinal as two u64, then zeros.
* Coordination with unplug: every batch of writes runs under ``lock`` (the machine lock,
  which every plug, unplug and reset holds), and the plugged runs are read from the
  devices inside that same critical section. A page is therefore never written once its
  block has been unplugged, whoever unplugs it (guest driver, reset, migration).
* :meth:`pause` returns only when no write is in flight and none starts until
  :meth:`resume` (the vCPUs are stopped, as for a migration's switchover). It nests:
  ``n`` pauses need ``n`` resumes. Writes use ``ctypes.memmove`` into the host mapping,
  so a write never runs Python code that could wait for the GIL while the kernel handles
  a fault on that page.
* :meth:`stop` ends the thread (idempotent). ``pages_written`` counts writes;
  :meth:`latencies` returns per-batch write latencies (seconds per page) measured inside
  the thread, :meth:`page_latencies` each page write's own, for benchmarks.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable, Sequence
from enum import StrEnum
from typing import Protocol

import numpy as np

PAGE = 4096
TICK = 0.01
"""Seconds between batches of writes."""
_LAT_KEEP = 100_000


class WritePattern(StrEnum):
    RANDOM = "random"
    HOT = "hot"
    SEQUENTIAL = "sequential"


class WriteTarget(Protocol):
    """A device's RAM as the writer sees it: its host mapping and plugged runs."""

    @property
    def host_address(self) -> int: ...

    def plugged_ranges(self) -> Sequence[tuple[int, int]]:
        """(region offset, length) of every plugged run, ascending."""


class DeviceTarget:
    """A :class:`WriteTarget` over a virtio-mem device and its RAM block."""

    def __init__(self, device: object, block: object) -> None:
        self._device = device
        self._block = block

    @property
    def host_address(self) -> int:
        return int(self._block.host_address)  # type: ignore[attr-defined]

    def plugged_ranges(self) -> Sequence[tuple[int, int]]:
        return list(self._device.plugged_ranges())  # type: ignore[attr-defined]


class GuestWriter:
    """Writes plugged memory continuously (module rules).

    Raises ValueError for a negative rate, an unknown pattern or a negative hot set.
    """

    def __init__(
        self,
        targets: Sequence[WriteTarget],
        lock: threading.RLock,
        *,
        rate: int,
        pattern: WritePattern | str = WritePattern.RANDOM,
        hot_set: int = 64 * 1024 * 1024,
        seed: int = 1,
        clock: Callable[[], float] = time.monotonic,
        seq_base: int = 0,
    ) -> None:
        if rate < 0:
            raise ValueError(f"write rate must be >= 0, got {rate}")
        if hot_set < 0:
            raise ValueError(f"hot set must be >= 0, got {hot_set}")
        self.pattern = WritePattern(pattern)
        self.targets = list(targets)
        self.lock = lock
        self.rate = rate
        self.hot_set = hot_set
        self.clock = clock
        self.pages_written = 0
        self._rng = np.random.default_rng(seed)
        self._cursor = 0
        self._seq = seq_base
        self._page = ctypes.create_string_buffer(PAGE)
        self._paused = 0
        self._cond = threading.Condition(threading.Lock())
        self._in_batch = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lat: list[float] = []
        self._page_lat: list[float] = []

    # -- control ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None or self.rate == 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ramdiscard-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        t.join()
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def pause(self) -> None:
        """Stop writing; returns when no write is in flight (module rules)."""
        with self._cond:
            self._paused += 1
            self._cond.wait_for(lambda: not self._in_batch)

    def resume(self) -> None:
        with self._cond:
            if self._paused:
                self._paused -= 1
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused > 0

    def latencies(self) -> list[float]:
        with self._cond:
            return list(self._lat)

    def page_latencies(self, reset: bool = False) -> list[float]:
        """Seconds each single page write took (the first :data:`_LAT_KEEP` since the
        last reset); ``reset`` starts a new series."""
        with self._cond:
            out = list(self._page_lat)
            if reset:
                self._page_lat = []
            return out

    # -- the thread -------------------------------------------------------------------------

    def _run(self) -> None:
        owed = 0.0
        last = self.clock()
        while not self._stop.is_set():
            self._stop.wait(TICK)
            now = self.clock()
            owed = min(owed + (now - last) * self.rate, float(self.rate))
            last = now
            n = int(owed // PAGE)
            if n == 0:
                continue
            with self._cond:
                if self._paused or self._stop.is_set():
                    owed = 0.0
                    continue
                self._in_batch = True
            try:
                done = self._batch(n)
            finally:
                with self._cond:
                    self._in_batch = False
                    self._cond.notify_all()
            owed -= n * PAGE if done else owed

    def _batch(self, n: int) -> bool:
        with self.lock:
            runs: list[tuple[int, int, int]] = []  # (host address, length, first plugged page)
            total = 0
            for t in self.targets:
                base = t.host_address
                for off, length in t.plugged_ranges():
                    runs.append((base + off, length, total))
                    total += length // PAGE
            if total == 0:
                return False
            pages = self._pick(n, total)
            starts = np.fromiter((r[2] for r in runs), dtype=np.int64, count=len(runs))
            which = np.searchsorted(starts, pages, side="right") - 1
            t0 = time.perf_counter()
            buf = self._page
            addr_of = ctypes.addressof(buf)
            clock = time.perf_counter
            each = self._page_lat
            for page, i in zip(pages.tolist(), which.tolist(), strict=True):
                addr, _length, first = runs[i]
                self._seq += 1
                struct.pack_into("<QQ", buf, 0, self._seq, page)
                t_page = clock()
                ctypes.memmove(addr + (page - first) * PAGE, addr_of, PAGE)
                if len(each) < _LAT_KEEP:
                    each.append(clock() - t_page)
            per_page = (time.perf_counter() - t0) / n
            self.pages_written += n
        with self._cond:
            if len(self._lat) < _LAT_KEEP:
                self._lat.append(per_page)
        return True

    def _pick(self, n: int, total: int) -> np.ndarray:
        if self.pattern is WritePattern.SEQUENTIAL:
            pages = (np.arange(n, dtype=np.int64) + self._cursor) % total
            self._cursor = int((self._cursor + n) % total)
            return pages
        span = total
        if self.pattern is WritePattern.HOT:
            span = max(1, min(total, self.hot_set // PAGE))
        return np.sort(self._rng.integers(0, span, size=n, dtype=np.int64))
