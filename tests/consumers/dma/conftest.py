"""Fixtures for the DMA backend tests: private anonymous mappings and /proc readings."""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator

import pytest

from ramdiscard.consumers.dma import iouring_available

IOURING_OK, IOURING_REASON = iouring_available()
needs_iouring = pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field (VmPin, VmLck, VmRSS, RssAnon) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def meminfo_kib(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


class Anon:
    """A private anonymous mapping (4 KiB pages unless ``thp``), unmapped at teardown."""

    def __init__(self, size: int, thp: bool = False) -> None:
        self.size = size
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.map.madvise(mmap.MADV_HUGEPAGE if thp else mmap.MADV_NOHUGEPAGE)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.map))

    def fill(self, byte: bytes, offset: int = 0, length: int | None = None) -> None:
        length = self.size - offset if length is None else length
        ctypes.memset(self.address + offset, byte[0], length)

    def read(self, offset: int, length: int) -> bytes:
        return ctypes.string_at(self.address + offset, length)

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        length = self.size - offset if length is None else length
        self.map.madvise(mmap.MADV_DONTNEED, offset, length)

    def close(self) -> None:
        self.map.close()


@pytest.fixture
def anon() -> Iterator[Callable[..., Anon]]:
    made: list[Anon] = []

    def make(size: int, thp: bool = False) -> Anon:
        a = Anon(size, thp)
        made.append(a)
        return a

    yield make
    for a in made:
        a.close()


def free_pages_kib() -> int:
    """Free memory including the per-CPU page lists, in KiB.

    MemFree leaves out pages parked on per-CPU lists, which here may hold hundreds of MiB
    (``high_max`` in /proc/zoneinfo), so a freshly freed range often does not show in it.
    """
    total = 0
    with open("/proc/zoneinfo") as f:
        for line in f:
            words = line.split()
            if words[:2] == ["pages", "free"] or words[:1] == ["count:"]:
                total += int(words[-1])
    return total * 4
