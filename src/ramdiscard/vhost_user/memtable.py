"""The frontend's memory table (SET_MEM_TABLE): mapped regions and address translation.

Rules:

* :meth:`MemoryTable.from_regions` validates everything before mapping anything:
  1..8 regions, each of positive size, page-aligned ``mmap_offset``, no guest-physical
  overlap, no overflow of ``gpa + size`` or ``uva + size``. Any violation raises
  :class:`MemTableError` and maps nothing. A failing mmap unmaps what was mapped. The
  descriptors are not closed by the table (the caller owns them).
* :meth:`MemoryTable.read` / :meth:`MemoryTable.write` access ``length`` bytes at a
  guest-physical address; the range must lie inside one region, otherwise
  :class:`AddressError` (nothing read or written). Ranges crossing a region boundary are
  refused even if the regions are adjacent: the split ring needs contiguous host memory.
* :meth:`MemoryTable.uva_to_gpa` translates the frontend's virtual addresses (vring
  addresses are given that way) with the same bounds rule.
* :meth:`MemoryTable.close` unmaps every region; access after it raises AddressError.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import struct
from dataclasses import dataclass

from ramdiscard.errors import ProtocolViolation
from ramdiscard.vhost_user.wire import MAX_MEM_REGIONS, MemRegion

U64_LIMIT = 1 << 64


class MemTableError(ProtocolViolation):
    """The memory table is malformed or cannot be mapped; nothing is mapped."""


class AddressError(ProtocolViolation):
    """A guest address range lies outside the memory table."""


@dataclass(slots=True)
class MappedRegion:
    region: MemRegion
    fd: int
    mapping: mmap.mmap | None

    @property
    def gpa(self) -> int:
        return self.region.guest_phys_addr

    @property
    def size(self) -> int:
        return self.region.memory_size


class MemoryTable:
    """Mapped regions of one SET_MEM_TABLE; see the module rules."""

    def __init__(self, regions: list[MappedRegion]) -> None:
        self._regions = sorted(regions, key=lambda r: r.gpa)
        self._closed = False

    @classmethod
    def from_regions(cls, regions: list[MemRegion], fds: list[int] | tuple[int, ...]) -> MemoryTable:
        if not 1 <= len(regions) <= MAX_MEM_REGIONS:
            raise MemTableError(f"memory table has {len(regions)} regions, expected 1..{MAX_MEM_REGIONS}")
        if len(fds) != len(regions):
            raise MemTableError(f"memory table has {len(regions)} regions but {len(fds)} descriptors")
        page = mmap.PAGESIZE
        for r in regions:
            if r.memory_size <= 0:
                raise MemTableError(f"memory region at gpa {r.guest_phys_addr:#x} has size 0")
            if r.mmap_offset % page:
                raise MemTableError(f"memory region mmap offset {r.mmap_offset:#x} is not page aligned")
            if (
                r.guest_phys_addr + r.memory_size > U64_LIMIT
                or r.userspace_addr + r.memory_size > U64_LIMIT
                or r.mmap_offset + r.memory_size > U64_LIMIT
            ):
                raise MemTableError(f"memory region at gpa {r.guest_phys_addr:#x} wraps around")
        ordered = sorted(regions, key=lambda r: r.guest_phys_addr)
        for a, b in itertools.pairwise(ordered):
            if a.guest_phys_addr + a.memory_size > b.guest_phys_addr:
                raise MemTableError(
                    f"memory regions at gpa {a.guest_phys_addr:#x} and {b.guest_phys_addr:#x} overlap"
                )
        mapped: list[MappedRegion] = []
        try:
            for r, fd in zip(regions, fds, strict=True):
                try:
                    size = os.fstat(fd).st_size
                except OSError as exc:
                    raise MemTableError(f"memory region descriptor {fd}: {exc.strerror}") from None
                if r.mmap_offset + r.memory_size > size:
                    raise MemTableError(
                        f"memory region at gpa {r.guest_phys_addr:#x} ends past its file "
                        f"({r.mmap_offset + r.memory_size:#x} > {size:#x})"
                    )
                try:
                    mm = mmap.mmap(fd, r.memory_size, mmap.MAP_SHARED, offset=r.mmap_offset)
                except (OSError, ValueError, OverflowError) as exc:
                    raise MemTableError(
                        f"cannot map memory region at gpa {r.guest_phys_addr:#x}: {exc}"
                    ) from None
                mapped.append(MappedRegion(r, fd, mm))
        except BaseException:
            for m in mapped:
                if m.mapping is not None:
                    m.mapping.close()
            raise
        return cls(mapped)

    @property
    def regions(self) -> list[MappedRegion]:
        return list(self._regions)

    def find(self, gpa: int, length: int) -> tuple[MappedRegion, int]:
        """(region, offset in it) holding ``[gpa, gpa+length)``; AddressError otherwise."""
        if self._closed:
            raise AddressError("memory table is closed")
        if gpa < 0 or length < 0:
            raise AddressError(f"negative guest range {gpa:#x}+{length:#x}")
        for m in self._regions:
            if m.gpa <= gpa and gpa + length <= m.gpa + m.size:
                return m, gpa - m.gpa
        raise AddressError(f"guest range {gpa:#x}+{length:#x} is outside the memory table")

    def uva_to_gpa(self, uva: int, length: int) -> int:
        if self._closed:
            raise AddressError("memory table is closed")
        for m in self._regions:
            base = m.region.userspace_addr
            if base <= uva and uva + length <= base + m.size:
                return m.gpa + (uva - base)
        raise AddressError(f"frontend address range {uva:#x}+{length:#x} is outside the memory table")

    def read(self, gpa: int, length: int) -> bytes:
        m, off = self.find(gpa, length)
        assert m.mapping is not None
        return m.mapping[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        m, off = self.find(gpa, len(data))
        assert m.mapping is not None
        m.mapping[off : off + len(data)] = data

    def read_u16(self, gpa: int) -> int:
        value: int = struct.unpack("<H", self.read(gpa, 2))[0]
        return value

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value))

    def file_location(self, gpa: int, length: int) -> tuple[int, int]:
        """(descriptor, file offset) backing ``[gpa, gpa+length)``."""
        m, off = self.find(gpa, length)
        return m.fd, m.region.mmap_offset + off

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Unmap every region (idempotent). Descriptors stay open (owned by the caller)."""
        if self._closed:
            return
        self._closed = True
        for m in self._regions:
            if m.mapping is not None:
                with contextlib.suppress(BufferError):
                    m.mapping.close()
                m.mapping = None
