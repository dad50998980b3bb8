"""The io_uring backend's slot bookkeeping and availability probe.

* :func:`available` tells whether io_uring sparse fixed buffers work here, with the
  reason when they do not.
* :class:`SlotRing` is one ring and which of its buffer slots are in use (one byte per slot);
  free slots are taken lowest first, as runs of consecutive slots.
* :class:`Buffer` is one registered fixed buffer of a pin; :func:`slot_of` finds the
  i-th slot of a list of slot runs.

Used by :mod:`ramdiscard.consumers.dma.iouring`, whose docstring has the rules.
"""

from __future__ import annotations

import errno
import platform
from functools import lru_cache
from typing import NamedTuple

from ramdiscard.consumers.dma.rawring import RawRing
from ramdiscard.errors import HostMemoryError


@lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether io_uring sparse fixed buffers work here; the reason when they do not."""
    if platform.machine() != "x86_64":
        machine = platform.machine()
        return False, f"io_uring backend uses x86_64 syscall numbers; machine is {machine}"
    try:
        with RawRing(1) as ring:
            ring.register_sparse(1)
    except HostMemoryError as e:
        if e.errno == errno.ENOSYS:
            return False, "io_uring_setup: ENOSYS (kernel built without io_uring)"
        if e.errno == errno.EPERM:
            try:
                with open("/proc/sys/kernel/io_uring_disabled") as f:
                    setting = f.read().strip()
            except OSError:
                setting = "?"
            return False, f"io_uring_setup: EPERM (kernel.io_uring_disabled={setting})"
        if e.errno == errno.EINVAL:
            return False, f"sparse buffer tables unsupported (kernel < 5.19?): {e}"
        return False, str(e)
    return True, "io_uring sparse fixed buffers available"


class SlotRing:
    """One ring and which of its slots are in use (one byte per slot, 1 = used)."""

    __slots__ = ("raw", "state", "used")

    def __init__(self, raw: RawRing) -> None:
        self.raw = raw
        self.state = bytearray(raw.slots)
        self.used = 0

    def take(self, n: int) -> list[tuple[int, int]]:
        """Mark up to ``n`` free slots used, lowest first, and return them as runs of
        consecutive slots ``(first, count)``, ascending; fewer than ``n`` when the ring
        fills up."""
        state = self.state
        runs: list[tuple[int, int]] = []
        pos = 0
        while n:
            first = state.find(0, pos)
            if first < 0:
                break
            end = state.find(1, first)
            if end < 0:
                end = len(state)
            count = min(n, end - first)
            state[first : first + count] = b"\1" * count
            runs.append((first, count))
            n -= count
            self.used += count
            pos = first + count
        return runs

    def give_back(self, first: int, count: int = 1) -> None:
        self.state[first : first + count] = bytes(count)
        self.used -= count


def slot_of(runs: list[tuple[int, int, int]], i: int) -> tuple[int, int]:
    """(ring index, slot) of the ``i``-th slot of ``runs`` ((ring index, first, count)
    runs of consecutive slots, in order); IndexError past their end."""
    pos = 0
    for index, first, count in runs:
        if i < pos + count:
            return index, first + i - pos
        pos += count
    raise IndexError(i)


class Buffer(NamedTuple):
    """One registered fixed buffer of a pin: which ring and slot, and what it covers."""

    ring: int
    slot: int
    address: int
    size: int
