"""Thin, typed wrappers over the Linux memory syscalls the host-memory layer needs.

Rules:

* Every wrapper either succeeds or raises :class:`~ramdiscard.errors.HostMemoryError`
  carrying the kernel's errno and a message naming the call, its arguments and the byte
  range in hex (``[start, end)``). Nothing here retries or falls back; callers decide.
* These functions do not call :func:`ramdiscard.faults.checkpoint`: they are the raw
  layer. The code that decides to change memory (``RamBlock``) places the checkpoints.
* The stdlib is used where it covers a call (``mmap.mmap.madvise``, ``os.memfd_create``)
  because it is cheaper per call (about 0.2 us over C, against about 0.8 us for ctypes, see
  ``host-limits.md``). ctypes covers the rest: ``fallocate`` with a mode, ``mincore``,
  ``mlock``/``munlock`` and ``madvise`` on raw addresses.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import mmap
import os
from typing import Final

from ramdiscard.errors import HostMemoryError

# madvise advice values (include/uapi/asm-generic/mman-common.h).
MADV_NORMAL: Final = 0
MADV_WILLNEED: Final = 3
MADV_DONTNEED: Final = 4
MADV_FREE: Final = 8
MADV_REMOVE: Final = 9
MADV_HUGEPAGE: Final = 14
MADV_NOHUGEPAGE: Final = 15
MADV_COLLAPSE: Final = 25
MADV_POPULATE_READ: Final = 22
MADV_POPULATE_WRITE: Final = 23

# fallocate modes (include/uapi/linux/falloc.h).
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02

# mmap flags that Python 3.11's mmap module does not export.
MAP_SHARED: Final = mmap.MAP_SHARED
MAP_PRIVATE: Final = mmap.MAP_PRIVATE
MAP_ANONYMOUS: Final = mmap.MAP_ANONYMOUS
MAP_NORESERVE: Final = 0x4000

# memfd_create flags.
MFD_CLOEXEC: Final = os.MFD_CLOEXEC
MFD_HUGETLB: Final = os.MFD_HUGETLB

# statfs magic numbers.
HUGETLBFS_MAGIC: Final = 0x958458F6

_ADVICE_NAMES: Final = {
    MADV_NORMAL: "MADV_NORMAL",
    MADV_WILLNEED: "MADV_WILLNEED",
    MADV_DONTNEED: "MADV_DONTNEED",
    MADV_FREE: "MADV_FREE",
    MADV_REMOVE: "MADV_REMOVE",
    MADV_HUGEPAGE: "MADV_HUGEPAGE",
    MADV_NOHUGEPAGE: "MADV_NOHUGEPAGE",
    MADV_COLLAPSE: "MADV_COLLAPSE",
    MADV_POPULATE_READ: "MADV_POPULATE_READ",
    MADV_POPULATE_WRITE: "MADV_POPULATE_WRITE",
}

_libc = ctypes.CDLL(None, use_errno=True)

_fallocate = _libc.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_fallocate.restype = ctypes.c_int

_mincore = _libc.mincore
_mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_mincore.restype = ctypes.c_int

_madvise = _libc.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int

_mlock = _libc.mlock
_mlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_mlock.restype = ctypes.c_int

_munlock = _libc.munlock
_munlock.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_munlock.restype = ctypes.c_int


class _StatFs(ctypes.Structure):
    # struct statfs on 64-bit Linux: every field is a long except f_fsid (2 ints).
    _fields_ = [
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_ulong),
        ("f_bfree", ctypes.c_ulong),
        ("f_bavail", ctypes.c_ulong),
        ("f_files", ctypes.c_ulong),
        ("f_ffree", ctypes.c_ulong),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    ]


_fstatfs = _libc.fstatfs
_fstatfs.argtypes = (ctypes.c_int, ctypes.POINTER(_StatFs))
_fstatfs.restype = ctypes.c_int


def advice_name(advice: int) -> str:
    """The symbolic name of a madvise advice value (``"MADV_23"`` if unknown)."""
    return _ADVICE_NAMES.get(advice, f"MADV_{advice}")


def errno_name(code: int) -> str:
    return _errno.errorcode.get(code, str(code))


def describe_range(offset: int, length: int) -> str:
    """``[0x1000, 0x3000)``: the half-open range used in every error message."""
    return f"[{offset:#x}, {offset + length:#x})"


def error(code: int, what: str) -> HostMemoryError:
    """Build the HostMemoryError for a failed call: ``what`` plus the errno name and text."""
    return HostMemoryError(code, f"{what} failed: {errno_name(code)} ({os.strerror(code)})")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2). Raises HostMemoryError naming the fd, mode and file range."""
    if _fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise error(code, f"fallocate(fd={fd}, mode={mode:#x}) of {describe_range(offset, length)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the file range (PUNCH_HOLE | KEEP_SIZE); it reads back as zeros."""
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        code = ctypes.get_errno()
        raise error(code, f"fallocate(PUNCH_HOLE) of file range {describe_range(offset, length)}")


def madvise(addr: int, length: int, advice: int) -> None:
    """madvise(2) on a raw address (``addr`` page aligned). Raises HostMemoryError."""
    if _madvise(addr, length, advice) != 0:
        code = ctypes.get_errno()
        raise error(code, f"madvise({advice_name(advice)}) of {describe_range(addr, length)}")


def mlock(addr: int, length: int) -> None:
    """mlock(2): locks (and populates) the range. Raises HostMemoryError."""
    if _mlock(addr, length) != 0:
        code = ctypes.get_errno()
        raise error(code, f"mlock of {describe_range(addr, length)}")


def munlock(addr: int, length: int) -> None:
    """munlock(2). Raises HostMemoryError."""
    if _munlock(addr, length) != 0:
        code = ctypes.get_errno()
        raise error(code, f"munlock of {describe_range(addr, length)}")


def mincore(addr: int, length: int, page_size: int = mmap.PAGESIZE) -> bytearray:
    """mincore(2): one byte per base page of ``[addr, addr+length)``, bit 0 = resident.

    ``addr`` must be page aligned. For shared (memfd, tmpfs, hugetlbfs) mappings the
    kernel reports page-cache residency, i.e. memory the host holds for the file.
    """
    npages = (length + page_size - 1) // page_size
    vec = bytearray(npages)
    if npages:
        buf = (ctypes.c_char * npages).from_buffer(vec)
        rc = _mincore(addr, length, ctypes.addressof(buf))
        del buf  # drop the export so the bytearray stays resizable
        if rc != 0:
            code = ctypes.get_errno()
            raise error(code, f"mincore of {describe_range(addr, length)}")
    return vec


_MINCORE_CHUNK_PAGES: Final = 1 << 18  # 1 GiB of address space per call, 256 KiB vector


def resident_pages(addr: int, length: int) -> int:
    """Number of resident base pages in ``[addr, addr+length)`` by mincore, in chunks so
    that a sparse 1 TiB range needs no 256 MiB vector. ``addr`` must be page aligned."""
    page = mmap.PAGESIZE
    npages = (length + page - 1) // page
    vec = bytearray(min(npages, _MINCORE_CHUNK_PAGES))
    buf = (ctypes.c_char * len(vec)).from_buffer(vec)
    vec_addr = ctypes.addressof(buf)
    resident = 0
    done = 0
    while done < npages:
        count = min(npages - done, _MINCORE_CHUNK_PAGES)
        start = addr + done * page
        if _mincore(start, count * page, vec_addr) != 0:
            code = ctypes.get_errno()
            raise error(code, f"mincore of {describe_range(start, count * page)}")
        # bit 0 is "resident"; the other bits are reserved and always 0
        resident += count - vec.count(0, 0, count)
        done += count
    return resident


def fstatfs_type(fd: int) -> tuple[int, int]:
    """(f_type, f_bsize) of the filesystem holding ``fd``. Raises HostMemoryError."""
    st = _StatFs()
    if _fstatfs(fd, ctypes.byref(st)) != 0:
        code = ctypes.get_errno()
        raise error(code, f"fstatfs(fd={fd})")
    return int(st.f_type) & 0xFFFFFFFF, int(st.f_bsize)


def memfd_create(name: str, *, hugetlb: bool = False) -> int:
    """A close-on-exec memfd (optionally on the hugetlb pool). Raises HostMemoryError."""
    flags = MFD_CLOEXEC | (MFD_HUGETLB if hugetlb else 0)
    try:
        return os.memfd_create(name, flags)
    except OSError as exc:
        code = exc.errno if exc.errno is not None else _errno.EIO
        kind = "hugetlb memfd" if hugetlb else "memfd"
        raise error(code, f"memfd_create of {kind} {name!r}") from None


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = (ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = (ctypes.POINTER(_PyBuffer),)
_release_buffer.restype = None


def buffer_address(obj: object) -> int:
    """Address of the first byte of a buffer-protocol object, read-only ones included.

    The export is released before returning; the address stays valid only as long as the
    object keeps its memory (for an mmap: until it is closed).
    """
    view = _PyBuffer()
    if _get_buffer(obj, ctypes.byref(view), 0) != 0:  # pragma: no cover - raises in ctypes
        raise TypeError("object does not support the buffer protocol")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))
