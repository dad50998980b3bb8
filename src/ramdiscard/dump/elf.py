"""ELF core files of guest memory, in the layout of QEMU's ``dump-guest-memory``.

Rules:

* ELF64, little-endian, ``ET_CORE``, ``e_machine`` of the host (x86-64, AArch64, ...).
* One ``PT_LOAD`` per guest-physical block: ``p_paddr`` is the guest-physical address,
  ``p_vaddr`` is 0 (QEMU without paging), ``p_filesz == p_memsz``, flags RWX, data at a
  4 KiB aligned file offset (``p_align`` 4096). No ``PT_NOTE`` (no vCPU state here).
* More than 65534 program headers use the ``PN_XNUM`` extension (``e_phnum`` 0xffff, the
  real count in section header 0's ``sh_info``), as QEMU does.
* Guest memory goes from the RAM block's memoryview to the file with ``pwrite``: no copy
  in Python. Gaps between segments are left as holes.

:func:`elf_headers` is pure (it computes the layout); :func:`write_core` does the I/O.
"""

from __future__ import annotations

import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from ramdiscard import faults
from ramdiscard.faults import Op
from ramdiscard.units import align_up

ET_CORE = 4
PT_LOAD = 1
PF_RWX = 7
PN_XNUM = 0xFFFF
SEGMENT_ALIGN = 4096
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_MACHINES = {
    "x86_64": 62,
    "amd64": 62,
    "aarch64": 183,
    "arm64": 183,
    "ppc64le": 21,
    "s390x": 22,
    "riscv64": 243,
}


def host_machine() -> int:
    """ELF ``e_machine`` of this host (EM_NONE if unknown)."""
    return _MACHINES.get(platform.machine().lower(), 0)


@dataclass(frozen=True, slots=True)
class Segment:
    """One PT_LOAD: ``size`` bytes for guest-physical ``paddr`` at file ``file_offset``."""

    paddr: int
    size: int
    file_offset: int


def elf_headers(blocks: Sequence[tuple[int, int]], machine: int | None = None) -> tuple[bytes, list[Segment]]:
    """The ELF header + program headers (+ the PN_XNUM section header) for ``blocks``
    given as (guest-physical address, size), and where each block's data goes."""
    machine = host_machine() if machine is None else machine
    n = len(blocks)
    xnum = n >= PN_XNUM
    head = _EHDR.size + n * _PHDR.size + (_SHDR.size if xnum else 0)
    pos = align_up(head, SEGMENT_ALIGN)
    segments: list[Segment] = []
    for paddr, size in blocks:
        segments.append(Segment(paddr, size, pos))
        pos = align_up(pos + size, SEGMENT_ALIGN)
    shoff = _EHDR.size + n * _PHDR.size if xnum else 0
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    out = [
        _EHDR.pack(
            ident,
            ET_CORE,
            machine,
            1,
            0,
            _EHDR.size,
            shoff,
            0,
            _EHDR.size,
            _PHDR.size,
            PN_XNUM if xnum else n,
            _SHDR.size if xnum else 0,
            1 if xnum else 0,
            0,
        )
    ]
    for seg in segments:
        out.append(
            _PHDR.pack(PT_LOAD, PF_RWX, seg.file_offset, 0, seg.paddr, seg.size, seg.size, SEGMENT_ALIGN)
        )
    if xnum:
        out.append(_SHDR.pack(0, 0, 0, 0, 0, 0, 0, n, 0, 0))
    return b"".join(out), segments


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    with memoryview(data) as view:
        pos = 0
        while pos < view.nbytes:
            faults.checkpoint(Op.FILE_WRITE)
            pos += os.pwrite(fd, view[pos:], offset + pos)


def write_core(fd: int, headers: bytes, segments: Sequence[Segment], views: Sequence[memoryview]) -> int:
    """Write a core file to ``fd`` (truncated first); ``views[i]`` is segment i's memory.
    Returns the file size."""
    faults.checkpoint(Op.FILE_WRITE)
    os.ftruncate(fd, 0)
    pwrite_all(fd, headers, 0)
    end = len(headers)
    for seg, view in zip(segments, views, strict=True):
        pwrite_all(fd, view, seg.file_offset)
        end = seg.file_offset + seg.size
    os.ftruncate(fd, end)
    return end
