"""userfaultfd write protection and PAGEMAP_SCAN: exact dirty tracking of host memory.

Rules (live-migration.md):

* :class:`WriteTracker` opens a userfaultfd with ``UFFD_FEATURE_WP_ASYNC`` (writes to a
  protected page are resolved by the kernel itself: no fault message, no handler thread,
  so nothing can wait on the GIL) and ``UFFD_FEATURE_WP_UNPOPULATED`` (a never-touched
  page can be protected too, so its first write is seen), plus
  ``WP_HUGETLBFS_SHMEM`` for memfd/shmem mappings. It registers one mapping in WP mode.
* :meth:`WriteTracker.protect` write-protects a range; :meth:`WriteTracker.scan_reset`
  returns the runs written since their last protection and protects them again in the
  same ioctl (``PAGEMAP_SCAN`` with ``PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC`` on
  ``/proc/self/pagemap``). A scan continues from the end of the last run returned while
  the result vector comes back full (``walk_end`` is not trusted: it can be stale).
* Anonymous memory: a discarded (``MADV_DONTNEED``) page loses its protection and is
  reported written; callers AND the result with what is populated.
* :func:`available` says whether all of this works here (and why not); everything else
  raises :class:`~ramdiscard.errors.HostMemoryError` with the errno and the call.
* :meth:`WriteTracker.close` unprotects, unregisters and closes (idempotent).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno as _errno
import os
from functools import cache
from typing import Final

from ramdiscard.errors import HostMemoryError

_SYS_USERFAULTFD: Final = 323  # x86-64
UFFD_USER_MODE_ONLY: Final = 1
UFFD_API: Final = 0xAA

FEATURE_WP_HUGETLBFS_SHMEM: Final = 1 << 12
FEATURE_WP_UNPOPULATED: Final = 1 << 13
FEATURE_WP_ASYNC: Final = 1 << 15

REGISTER_MODE_WP: Final = 2
WRITEPROTECT_MODE_WP: Final = 1

PM_SCAN_WP_MATCHING: Final = 1
PM_SCAN_CHECK_WPASYNC: Final = 2
PAGE_IS_WRITTEN: Final = 1 << 1


def iowr(kind: int, nr: int, size: int) -> int:
    """The number of a read-write ioctl (the kernel's ``_IOWR``)."""
    return (3 << 30) | (size << 16) | (kind << 8) | nr


def _ior(kind: int, nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (kind << 8) | nr


class _Api(ctypes.Structure):
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class UffdRange(ctypes.Structure):
    """``struct uffdio_range``."""

    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class UffdRegister(ctypes.Structure):
    """``struct uffdio_register``."""

    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class _WriteProtect(ctypes.Structure):
    _fields_ = [("range", UffdRange), ("mode", ctypes.c_uint64)]


class _PageRegion(ctypes.Structure):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64), ("categories", ctypes.c_uint64)]


_SCAN_FIELDS = (
    "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
    "category_inverted", "category_mask", "category_anyof_mask", "return_mask",
)  # fmt: skip


class _ScanArg(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _SCAN_FIELDS]


UFFDIO_API: Final = iowr(0xAA, 0x3F, ctypes.sizeof(_Api))
UFFDIO_REGISTER: Final = iowr(0xAA, 0x00, ctypes.sizeof(UffdRegister))
UFFDIO_UNREGISTER: Final = _ior(0xAA, 0x01, ctypes.sizeof(UffdRange))
UFFDIO_WRITEPROTECT: Final = iowr(0xAA, 0x06, ctypes.sizeof(_WriteProtect))
PAGEMAP_SCAN: Final = iowr(ord("f"), 16, ctypes.sizeof(_ScanArg))

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

VEC_LEN = 4096


def uffd_error(what: str) -> HostMemoryError:
    """HostMemoryError for the failed call ``what``, from the errno it left."""
    code = ctypes.get_errno()
    return HostMemoryError(code, f"{what}: {_errno.errorcode.get(code, str(code))} ({os.strerror(code)})")


def uffd_ioctl(fd: int, request: int, arg: ctypes.Structure, what: str) -> int:
    """``ioctl(fd, request, &arg)``; its result, or :func:`uffd_error` naming ``what``."""
    rc = int(_libc.ioctl(fd, request, ctypes.byref(arg)))
    if rc < 0:
        raise uffd_error(what)
    return rc


def open_uffd(features: int, user_mode_only: bool = True) -> int:
    """A new non-blocking, close-on-exec userfaultfd with ``features`` negotiated
    (UFFDIO_API); HostMemoryError when either step fails (no descriptor left open)."""
    flags = os.O_CLOEXEC | os.O_NONBLOCK | (UFFD_USER_MODE_ONLY if user_mode_only else 0)
    fd = int(_libc.syscall(_SYS_USERFAULTFD, flags))
    if fd < 0:
        raise uffd_error("userfaultfd()")
    try:
        api = _Api(UFFD_API, features, 0)
        uffd_ioctl(fd, UFFDIO_API, api, f"UFFDIO_API features {features:#x}")
    except BaseException:
        os.close(fd)
        raise
    return fd


@cache
def available() -> str | None:
    """None when WP_ASYNC tracking with PAGEMAP_SCAN works on this host, else why not."""
    import mmap

    try:
        fd = open_uffd(FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED)
    except HostMemoryError as exc:
        return f"userfaultfd with WP_ASYNC unavailable: {exc}"
    os.close(fd)
    mm = mmap.mmap(-1, 2 * mmap.PAGESIZE)
    try:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        try:
            with WriteTracker(addr, len(mm), shmem=False) as t:
                t.protect(0, len(mm))
                ctypes.memset(addr, 1, 1)
                runs = t.scan_reset(0, len(mm))
        except HostMemoryError as exc:
            return f"PAGEMAP_SCAN dirty tracking unavailable: {exc}"
        finally:
            del addr
        if runs != [(0, mmap.PAGESIZE)]:
            return f"PAGEMAP_SCAN reported {runs} for one written page"
    finally:
        with contextlib.suppress(BufferError):
            mm.close()
    return None


class WriteTracker:
    """Tracks writes to ``[addr, addr + length)`` of this process (module rules).
    ``shmem``: the mapping is shared memory (memfd, file), which needs its own feature.
    Offsets in this API are relative to ``addr``. Raises HostMemoryError."""

    def __init__(self, addr: int, length: int, *, shmem: bool) -> None:
        features = FEATURE_WP_ASYNC | FEATURE_WP_UNPOPULATED
        if shmem:
            features |= FEATURE_WP_HUGETLBFS_SHMEM
        self.addr = addr
        self.length = length
        self._fd: int | None = open_uffd(features)
        self._pagemap: int | None = None
        try:
            reg = UffdRegister(UffdRange(addr, length), REGISTER_MODE_WP, 0)
            uffd_ioctl(self._fd, UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER [{addr:#x}, +{length:#x})")
            self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise
        self._vec = (_PageRegion * VEC_LEN)()

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.length or (offset | length) & 0xFFF:
            raise ValueError(f"range [{offset:#x}, +{length:#x}) outside or misaligned in the tracked range")

    def _wp(self, offset: int, length: int, mode: int) -> None:
        self._check(offset, length)
        if self._fd is None:
            raise HostMemoryError(_errno.EBADF, "write tracker is closed")
        if length:
            arg = _WriteProtect(UffdRange(self.addr + offset, length), mode)
            uffd_ioctl(self._fd, UFFDIO_WRITEPROTECT, arg, f"UFFDIO_WRITEPROTECT [{offset:#x}, +{length:#x})")

    def protect(self, offset: int, length: int) -> None:
        """Write-protect the range: later writes show up in :meth:`scan_reset`."""
        self._wp(offset, length, WRITEPROTECT_MODE_WP)

    def unprotect(self, offset: int, length: int) -> None:
        self._wp(offset, length, 0)

    def scan_reset(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Runs (offset, length) written since last protected, ascending; protected again."""
        self._check(offset, length)
        if self._pagemap is None:
            raise HostMemoryError(_errno.EBADF, "write tracker is closed")
        out: list[tuple[int, int]] = []
        start, end = self.addr + offset, self.addr + offset + length
        vec = self._vec
        while start < end:
            arg = _ScanArg(
                ctypes.sizeof(_ScanArg), PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC, start, end, 0,
                ctypes.addressof(vec), VEC_LEN, 0, 0, PAGE_IS_WRITTEN, 0, PAGE_IS_WRITTEN,
            )  # fmt: skip
            what = f"PAGEMAP_SCAN [{start - self.addr:#x}, +{end - start:#x})"
            n = uffd_ioctl(self._pagemap, PAGEMAP_SCAN, arg, what)
            for i in range(n):
                r = vec[i]
                s, e = int(r.start) - self.addr, int(r.end) - self.addr
                if out and out[-1][0] + out[-1][1] == s:
                    out[-1] = (out[-1][0], out[-1][1] + e - s)
                else:
                    out.append((s, e - s))
            if n < VEC_LEN:
                break
            start = int(vec[n - 1].end)
        return out

    def close(self) -> None:
        if self._pagemap is not None:
            os.close(self._pagemap)
            self._pagemap = None
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            rng = UffdRange(self.addr, self.length)
            _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.byref(rng))  # closing unregisters too
        finally:
            os.close(fd)

    def __enter__(self) -> WriteTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


UFFD_EVENT_PAGEFAULT: Final = 0x12
PAGEFAULT_FLAG_WP: Final = 2
MSG_SIZE: Final = 32
"""``struct uffd_msg``: u8 event, 7 reserved bytes, then for a page fault u64 flags,
u64 address, u32 thread id."""


def writeprotect(fd: int, addr: int, length: int, protect: bool) -> None:
    """UFFDIO_WRITEPROTECT on ``[addr, addr + length)`` of the fd's process (usable from
    any process holding the fd); unprotecting wakes the threads waiting on the range.
    Raises HostMemoryError."""
    arg = _WriteProtect(UffdRange(addr, length), WRITEPROTECT_MODE_WP if protect else 0)
    uffd_ioctl(fd, UFFDIO_WRITEPROTECT, arg, f"UFFDIO_WRITEPROTECT [{addr:#x}, +{length:#x})")


class SyncWriteProtect:
    """A userfaultfd in synchronous write-protect mode: a write to a protected page stops
    the writing thread and queues a page-fault message on :attr:`fd`; the thread goes on
    once someone unprotects the page (:func:`writeprotect`). ``WP_UNPOPULATED`` makes a
    never-touched page protectable too. Not user-mode-only where allowed (root), so a
    kernel write into a protected page (a ``recv`` into guest memory) waits like a guest
    write instead of failing with EFAULT. The handler must run where the writer cannot
    block it (live-migration.md pitfall 1: another process). Raises HostMemoryError."""

    def __init__(self, *, shmem: bool) -> None:
        features = FEATURE_WP_UNPOPULATED | (FEATURE_WP_HUGETLBFS_SHMEM if shmem else 0)
        try:
            self.fd: int | None = open_uffd(features, user_mode_only=False)
        except HostMemoryError as exc:
            if exc.errno != _errno.EPERM:
                raise
            self.fd = open_uffd(features)
        self._registered: list[tuple[int, int]] = []

    def _live_fd(self) -> int:
        if self.fd is None:
            raise HostMemoryError(_errno.EBADF, "write protection is closed")
        return self.fd

    def register(self, addr: int, length: int) -> None:
        reg = UffdRegister(UffdRange(addr, length), REGISTER_MODE_WP, 0)
        uffd_ioctl(self._live_fd(), UFFDIO_REGISTER, reg, f"UFFDIO_REGISTER [{addr:#x}, +{length:#x})")
        self._registered.append((addr, length))

    def protect(self, addr: int, length: int) -> None:
        writeprotect(self._live_fd(), addr, length, True)

    def unprotect(self, addr: int, length: int) -> None:
        writeprotect(self._live_fd(), addr, length, False)

    def close(self) -> None:
        """Unprotect and unregister every registered range (waking any waiting writer),
        then close. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            for addr, length in self._registered:
                _libc.ioctl(fd, UFFDIO_WRITEPROTECT, ctypes.byref(_WriteProtect(UffdRange(addr, length), 0)))
                _libc.ioctl(fd, UFFDIO_UNREGISTER, ctypes.byref(UffdRange(addr, length)))
        finally:
            os.close(fd)


__all__ = ["SyncWriteProtect", "WriteTracker", "available", "writeprotect"]
