"""DMA "pinning" by mlock(2): pages are populated, resident and counted in VmLck.

Rules:

* mlock state is per page, not per call, so overlapping pins share it: a byte range is
  mlocked while at least one pin covers it and munlocked when its last pin goes.
  :class:`_Coverage` keeps that count as a step function over the address space; a pin
  mlocks only the sub-ranges it newly covers, an unpin munlocks only those it alone
  covered.
* Each mlock/munlock call passes ``faults.checkpoint(Op.MLOCK / Op.MUNLOCK)`` first. A
  failed pin munlocks what it locked (rollback is no fault point) and leaves the coverage
  unchanged. A failed unpin keeps the handle; the ranges already munlocked are reported
  released and the coverage records them, so a retry munlocks only the rest.
* The backend assumes it alone mlocks the ranges it pins: munlock is not reference
  counted by the kernel, so an mlock taken by someone else on the same pages is dropped
  when our last pin of them goes.

Theory: mlock is the weakest pin. It keeps pages resident and out of reclaim, but it is
not a DMA pin (no page refcount is held), and the kernel refuses ``MADV_DONTNEED`` on
locked memory with EINVAL, so a discard of pinned memory fails loudly instead of going
stale. ``dma_read`` therefore reads the memory itself: there is no separate device view.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import errno

from ramdiscard import faults
from ramdiscard.consumers.dma.backend import PAGE_SIZE, DmaBackend, PinHandle
from ramdiscard.errors import HostMemoryError
from ramdiscard.hostmem import syscalls


def _call(name: str, start: int, end: int) -> None:
    if name == "mlock":
        syscalls.mlock(start, end - start)
        return
    try:
        syscalls.munlock(start, end - start)
    except HostMemoryError as exc:
        if exc.errno != errno.ENOMEM:
            raise
        _munlock_mapped(start, end)


def _munlock_mapped(start: int, end: int) -> None:
    """munlock whatever is still mapped of ``[start, end)``.

    munlock stops with ENOMEM at the first unmapped page, but an unmapped page is not
    locked (munmap dropped it), so the pin is released once every mapped page is
    munlocked; this slow page-by-page pass only runs when the caller unmapped pinned
    memory.
    """
    for page in range(start, end, PAGE_SIZE):
        with contextlib.suppress(HostMemoryError):  # unmapped pages are not locked
            syscalls.munlock(page, PAGE_SIZE)


class _Coverage:
    """How many pins cover each address: a step function over sorted breakpoints.

    ``_count[b]`` holds from breakpoint ``b`` up to the next one; before the first
    breakpoint the count is 0. Adjacent equal steps are merged, so the size is O(pins).
    """

    def __init__(self) -> None:
        self._bounds: list[int] = []
        self._count: dict[int, int] = {}

    def _at(self, x: int) -> int:
        i = bisect.bisect_right(self._bounds, x) - 1
        return self._count[self._bounds[i]] if i >= 0 else 0

    def pieces(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """``[(s, e, count), ...]`` partitioning ``[start, end)``."""
        out: list[tuple[int, int, int]] = []
        pos, count = start, self._at(start)
        i = bisect.bisect_right(self._bounds, start)
        while i < len(self._bounds) and self._bounds[i] < end:
            b = self._bounds[i]
            out.append((pos, b, count))
            pos, count = b, self._count[b]
            i += 1
        out.append((pos, end, count))
        return out

    def ranges_with(self, start: int, end: int, count: int) -> list[tuple[int, int]]:
        return [(s, e) for s, e, c in self.pieces(start, end) if c == count]

    def add(self, start: int, end: int, delta: int) -> None:
        for x in (start, end):
            if x not in self._count:
                value = self._at(x)
                bisect.insort(self._bounds, x)
                self._count[x] = value
        lo = bisect.bisect_left(self._bounds, start)
        hi = bisect.bisect_left(self._bounds, end)
        for b in self._bounds[lo:hi]:
            self._count[b] += delta
        # Drop breakpoints that no longer change the count, in the touched window.
        i, last = lo, hi
        while i <= last and i < len(self._bounds):
            b = self._bounds[i]
            prev = self._count[self._bounds[i - 1]] if i > 0 else 0
            if self._count[b] == prev:
                del self._bounds[i]
                del self._count[b]
                last -= 1
            else:
                i += 1

    def is_empty(self) -> bool:
        return not self._bounds

    def span(self) -> tuple[int, int]:
        """First and last breakpoint (only meaningful when not empty)."""
        return self._bounds[0], self._bounds[-1]


class MlockDmaBackend(DmaBackend):
    """Pins by mlock/munlock with per-range reference counts (see module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._coverage = _Coverage()
        # Sub-ranges already munlocked by a failed unpin, per handle token.
        self._released: dict[int, list[tuple[int, int]]] = {}

    def locked_ranges(self) -> list[tuple[int, int]]:
        """The ranges this backend currently holds mlocked, as ``[(start, end), ...]``."""
        with self._lock:
            if self._coverage.is_empty():
                return []
            runs: list[tuple[int, int]] = []
            for s, e, c in self._coverage.pieces(*self._coverage.span()):
                if c <= 0:
                    continue
                if runs and runs[-1][1] == s:
                    runs[-1] = (runs[-1][0], e)
                else:
                    runs.append((s, e))
            return runs

    def _pin_impl(self, handle: PinHandle) -> None:
        done: list[tuple[int, int]] = []
        try:
            for start, end in self._coverage.ranges_with(handle.host_address, handle.end, 0):
                faults.checkpoint(faults.Op.MLOCK)
                _call("mlock", start, end)
                done.append((start, end))
        except BaseException:
            for start, end in reversed(done):
                _call("munlock", start, end)
            raise
        self._coverage.add(handle.host_address, handle.end, +1)

    def _unpin_impl(self, handle: PinHandle) -> None:
        # On a retry, ranges munlocked by the failed attempt are already out of the
        # coverage; _mine() skips them.
        for start, end in self._coverage.ranges_with(handle.host_address, handle.end, 1):
            if not self._mine(handle, start, end):
                continue
            faults.checkpoint(faults.Op.MUNLOCK)
            _call("munlock", start, end)
            self._coverage.add(start, end, -1)
            self._released.setdefault(handle.token, []).append((start, end))
            self._note_released(handle, end - start)
        for start, end, count in self._coverage.pieces(handle.host_address, handle.end):
            if count > 1 and self._mine(handle, start, end):
                self._coverage.add(start, end, -1)
                self._note_released(handle, end - start)
        self._released.pop(handle.token, None)

    def _mine(self, handle: PinHandle, start: int, end: int) -> bool:
        """False if this sub-range of ``handle`` was already released by a failed unpin."""
        return all(e <= start or s >= end for s, e in self._released.get(handle.token, ()))

    def _dma_read_impl(self, handle: PinHandle, offset: int, length: int) -> bytes:
        return ctypes.string_at(handle.host_address + offset, length)

    def _close_impl(self) -> None:
        for start, end in self.locked_ranges():
            _call("munlock", start, end)
        self._coverage = _Coverage()
        self._released.clear()
