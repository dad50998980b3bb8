"""userfaultfd MISSING mode: memory that is filled on first touch by someone else.

Rules (live-migration.md):

* :func:`open_missing` opens a userfaultfd for this process's memory with
  ``MISSING_SHMEM`` (memfd/shmem mappings can be registered too), not user-mode-only
  where allowed (root), so a kernel access (a ``recv`` into guest memory, a DMA pin)
  waits for the page like a guest access instead of failing with EFAULT. The fd can be
  handed to another process (inherited or over SCM_RIGHTS): :func:`copy`,
  :func:`zeropage` and :func:`wake` act on the memory of the process that opened it.
* :func:`register_missing` / :func:`unregister`: a touch of a missing page in a registered
  range stops the touching thread and queues a page-fault message (:func:`parse_fault`)
  until the page is placed.
* :func:`copy` places pages (UFFDIO_COPY) and returns the bytes it placed; pages already
  present are skipped (EEXIST on the first page, EAGAIN part-way: pitfall 4), so a page
  placed twice by two placers is fine. :func:`zeropage` places zero pages the same way.
* The handler must not be a thread that can wait for the faulting thread (pitfall 1:
  a Python thread of the faulting process deadlocks on the GIL): use another process.

Every failure raises :class:`~ramdiscard.errors.HostMemoryError` with the errno.
"""

from __future__ import annotations

import ctypes
import errno as _errno
import struct
from typing import Final

from ramdiscard.errors import HostMemoryError
from ramdiscard.hostmem.uffd import (
    UFFD_EVENT_PAGEFAULT,
    UFFDIO_REGISTER,
    UffdRange,
    UffdRegister,
    iowr,
    open_uffd,
    uffd_error,
    uffd_ioctl,
)

FEATURE_MISSING_SHMEM: Final = 1 << 5
REGISTER_MODE_MISSING: Final = 1
PAGE: Final = 4096
MSG = struct.Struct("<B7xQQ8x")
"""``struct uffd_msg`` for a page fault: event, flags, address (32 bytes)."""


class _Copy(ctypes.Structure):
    _fields_ = [
        ("dst", ctypes.c_uint64), ("src", ctypes.c_uint64), ("len", ctypes.c_uint64),
        ("mode", ctypes.c_uint64), ("copy", ctypes.c_int64),
    ]  # fmt: skip


class _ZeroPage(ctypes.Structure):
    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64), ("zeropage", ctypes.c_int64)]


def _ior(kind: int, nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | nr


UFFDIO_UNREGISTER: Final = _ior(0xAA, 0x01, ctypes.sizeof(UffdRange))
UFFDIO_WAKE: Final = _ior(0xAA, 0x02, ctypes.sizeof(UffdRange))
UFFDIO_COPY: Final = iowr(0xAA, 0x03, ctypes.sizeof(_Copy))
UFFDIO_ZEROPAGE: Final = iowr(0xAA, 0x04, ctypes.sizeof(_ZeroPage))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def open_missing() -> int:
    """A userfaultfd (O_NONBLOCK, O_CLOEXEC) ready for :func:`register_missing`."""
    try:
        return open_uffd(FEATURE_MISSING_SHMEM, user_mode_only=False)
    except HostMemoryError as exc:
        if exc.errno != _errno.EPERM:
            raise
        return open_uffd(FEATURE_MISSING_SHMEM)


def register_missing(fd: int, addr: int, length: int) -> None:
    reg = UffdRegister(UffdRange(addr, length), REGISTER_MODE_MISSING, 0)
    uffd_ioctl(fd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER missing [{addr:#x}, +{length:#x})")


def unregister(fd: int, addr: int, length: int) -> None:
    uffd_ioctl(fd, UFFDIO_UNREGISTER, UffdRange(addr, length), f"UFFDIO_UNREGISTER [{addr:#x}, +{length:#x})")


def wake(fd: int, addr: int, length: int) -> None:
    uffd_ioctl(fd, UFFDIO_WAKE, UffdRange(addr, length), f"UFFDIO_WAKE [{addr:#x}, +{length:#x})")


def _place(fd: int, dst: int, length: int, src: int | None) -> int:
    """Place ``length`` bytes at ``dst`` (from ``src``, or zero pages), skipping pages
    already present. Returns the bytes placed by this call."""
    done = placed = 0
    while done < length:
        if src is None:
            z = _ZeroPage(UffdRange(dst + done, length - done), 0, 0)
            rc = int(_libc.ioctl(fd, UFFDIO_ZEROPAGE, ctypes.byref(z)))
            got = int(z.zeropage)
        else:
            c = _Copy(dst + done, src + done, length - done, 0, 0)
            rc = int(_libc.ioctl(fd, UFFDIO_COPY, ctypes.byref(c)))
            got = int(c.copy)
        if rc == 0:
            return placed + length - done
        code = ctypes.get_errno()
        if got > 0:
            done += got
            placed += got
        if code == _errno.EEXIST:
            done += PAGE  # present already (another placer): skip it
        elif code != _errno.EAGAIN:  # EAGAIN: part done, or the mapping changed: go on
            raise uffd_error(f"{'UFFDIO_ZEROPAGE' if src is None else 'UFFDIO_COPY'} [{dst + done:#x}]")
    return placed


def copy(fd: int, dst: int, src: int, length: int) -> int:
    """UFFDIO_COPY ``length`` bytes from ``src`` (this process) to ``dst`` (module rules)."""
    return _place(fd, dst, length, src)


def zeropage(fd: int, dst: int, length: int) -> int:
    """UFFDIO_ZEROPAGE over ``[dst, dst + length)`` (module rules)."""
    return _place(fd, dst, length, None)


def parse_fault(msg: bytes | memoryview) -> int | None:
    """The faulting address of a page-fault message, None for other events."""
    event, _flags, address = MSG.unpack(msg)
    return int(address) if event == UFFD_EVENT_PAGEFAULT else None


__all__ = ["copy", "open_missing", "parse_fault", "register_missing", "unregister", "wake", "zeropage"]
