"""Guest memory for vhost-user tests: a memfd mapped through a real MemoryTable, and a
minimal split-ring driver that writes descriptors the way a guest does."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from ramdiscard.vhost_user.memtable import MemoryTable
from ramdiscard.vhost_user.wire import MemRegion

GPA_BASE = 0x100000
MEM_SIZE = 1 << 20
UVA_BASE = 0x7F0000000000
NUM = 8
DESC = GPA_BASE
AVAIL = GPA_BASE + 0x1000
USED = GPA_BASE + 0x2000
DATA = GPA_BASE + 0x10000


@pytest.fixture
def memory() -> Iterator[MemoryTable]:
    fd = os.memfd_create("vhost-test-guest")
    try:
        os.ftruncate(fd, MEM_SIZE)
        table = MemoryTable.from_regions([MemRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)], [fd])
        yield table
        table.close()
    finally:
        os.close(fd)


@dataclass
class Driver:
    """Writes descriptor chains into guest memory as a virtio driver would."""

    mem: MemoryTable
    num: int = NUM
    avail_idx: int = 0
    next_data: int = DATA

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int) -> None:
        self.mem.write(DESC + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def buffer(self, data: bytes | int) -> int:
        addr = self.next_data
        size = data if isinstance(data, int) else len(data)
        if not isinstance(data, int):
            self.mem.write(addr, data)
        self.next_data += (size + 15) & ~15
        return addr

    def publish(self, head: int) -> None:
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def add(self, head: int, request: bytes, capacity: int) -> int:
        """Chain at ``head``: one readable descriptor, one writable (its index head+1)."""
        out, inb = self.buffer(request), self.buffer(capacity)
        self.desc(head, out, len(request), 1, head + 1)
        self.desc(head + 1, inb, capacity, 2, 0)
        self.publish(head)
        return inb

    def used(self) -> list[tuple[int, int]]:
        idx = struct.unpack("<H", self.mem.read(USED + 2, 2))[0]
        return [struct.unpack("<II", self.mem.read(USED + 4 + 8 * (i % self.num), 8)) for i in range(idx)]


@pytest.fixture
def driver(memory: MemoryTable) -> Driver:
    return Driver(memory)
