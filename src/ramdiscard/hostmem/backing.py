"""Acquiring and mapping the host memory behind one RamBlock, all or nothing.

Rules:

* :func:`map_backing` creates the memfd or opens the file (``file`` backing: see
  :class:`~ramdiscard.hostmem.RamBlock` for the checks, the ``flock`` and the
  guest-memory registration with :mod:`ramdiscard.fileio`), learns the page size from the
  filesystem (hugetlbfs: its huge page size), extends the file to ``max_size`` when
  short, and maps ``max_size`` bytes with ``MAP_NORESERVE`` (private for anonymous
  memory, shared otherwise), passing ``faults.checkpoint(Op.MMAP)`` first. Anonymous
  memory is advised ``MADV_HUGEPAGE`` (``thp``) or ``MADV_NOHUGEPAGE``.
* Raises :class:`~ramdiscard.errors.InvalidArgument` (hugepages off hugetlbfs, sizes not
  multiples of the page size, a short read-only file, existing data refused) or
  :class:`~ramdiscard.errors.HostMemoryError` naming the block; everything acquired is
  released again first (mapping, registration, fd) and a file this call created is
  removed. A file that existed may remain extended.
* On success the caller owns the returned :class:`MappedBacking`: its fd (if any) and its
  mapping, and the registration when ``registered``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import mmap
import os
from dataclasses import dataclass
from enum import StrEnum

from ramdiscard import faults, fileio
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.faults import Op
from ramdiscard.hostmem import syscalls
from ramdiscard.hostmem.syscalls import describe_range

BASE_PAGE = mmap.PAGESIZE


class Backing(StrEnum):
    """Where a block's memory comes from."""

    ANONYMOUS = "anonymous"
    MEMFD = "memfd"
    FILE = "file"


def label(name: str, backing: Backing, hugetlb: bool) -> str:
    """How errors name a block: ``RamBlock 'name' (memfd hugetlb)``."""
    huge = " hugetlb" if hugetlb else ""
    return f"RamBlock {name!r} ({backing.value}{huge})"


def os_error(where: str, exc: OSError, op: str, offset: int, length: int) -> HostMemoryError:
    """``exc`` as a HostMemoryError naming ``where`` (a block label), ``op`` and the range."""
    code = exc.errno if exc.errno is not None else _errno.EIO
    return syscalls.error(code, f"{where}: {op} of {describe_range(offset, length)}")


def close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):  # already gone: nothing to free
        os.close(fd)


@dataclass(frozen=True, slots=True)
class MappedBacking:
    """What :func:`map_backing` acquired."""

    mm: mmap.mmap
    fd: int | None
    hugetlb: bool
    page_size: int
    created: bool
    file_id: fileio.FileId | None
    registered: bool


@dataclass(slots=True)
class _Acquired:
    fd: int | None = None
    mm: mmap.mmap | None = None
    created: bool = False
    file_id: fileio.FileId | None = None
    registered: bool = False

    def release(self, name: str, path: str | None) -> None:
        if self.created and self.file_id is not None and path is not None:
            fileio.unlink_created(path, self.file_id)
        mm, self.mm = self.mm, None
        if mm is not None:
            with contextlib.suppress(BufferError):
                mm.close()
        if self.registered and self.file_id is not None:
            self.registered = False
            fileio.unregister_guest_memory(self.file_id, name)
        fd, self.fd = self.fd, None
        if fd is not None:
            close_fd(fd)


def map_backing(
    name: str,
    backing: Backing,
    *,
    path: str | None,
    size: int,
    max_size: int,
    hugepages: bool,
    thp: bool,
    readonly: bool,
    allow_existing: bool,
) -> MappedBacking:
    """Acquire and map the memory of block ``name``; see the module rules."""
    got = _Acquired()
    try:
        return _map(got, name, backing, path, size, max_size, hugepages, thp, readonly, allow_existing)
    except BaseException:
        got.release(name, path)
        raise


def _map(
    got: _Acquired,
    name: str,
    backing: Backing,
    path: str | None,
    size: int,
    max_size: int,
    hugepages: bool,
    thp: bool,
    readonly: bool,
    allow_existing: bool,
) -> MappedBacking:
    page_size = BASE_PAGE
    hugetlb = False
    if backing is Backing.MEMFD:
        got.fd = syscalls.memfd_create(name, hugetlb=hugepages)
    elif backing is Backing.FILE:
        assert path is not None
        _open_file(got, name, path, readonly, allow_existing)
    fd = got.fd
    if fd is not None:
        fs_type, bsize = syscalls.fstatfs_type(fd)
        hugetlb = fs_type == syscalls.HUGETLBFS_MAGIC
        if hugetlb:
            page_size = bsize
        elif hugepages:
            raise InvalidArgument(f"RamBlock {name!r}: hugepages=True but {path!r} is not on hugetlbfs")
    if size % page_size or max_size % page_size:
        raise InvalidArgument(
            f"RamBlock {name!r}: size {size:#x} and max_size {max_size:#x} must be "
            f"multiples of the page size {page_size:#x}"
        )
    where = label(name, backing, hugetlb)
    prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
    if fd is None:
        flags = syscalls.MAP_PRIVATE | syscalls.MAP_NORESERVE
        faults.checkpoint(Op.MMAP)
        try:
            mm = mmap.mmap(-1, max_size, flags=flags, prot=prot)
        except OSError as exc:
            raise os_error(where, exc, "mmap", 0, max_size) from None
    else:
        file_size = os.fstat(fd).st_size
        if file_size < max_size:
            if readonly:
                raise InvalidArgument(
                    f"RamBlock {name!r}: read-only file {path!r} holds "
                    f"{file_size:#x} bytes, less than max_size {max_size:#x}"
                )
            try:
                os.ftruncate(fd, max_size)
            except OSError as exc:
                raise os_error(where, exc, "ftruncate", 0, max_size) from None
        flags = syscalls.MAP_SHARED | syscalls.MAP_NORESERVE
        faults.checkpoint(Op.MMAP)
        try:
            mm = mmap.mmap(fd, max_size, flags=flags, prot=prot)
        except OSError as exc:
            raise os_error(where, exc, "mmap", 0, max_size) from None
    got.mm = mm
    if backing is Backing.ANONYMOUS:
        # "madvise" THP mode needs HUGEPAGE to get huge pages; "always" mode needs
        # NOHUGEPAGE to keep a 4 KiB block on 4 KiB pages.
        advice = syscalls.MADV_HUGEPAGE if thp else syscalls.MADV_NOHUGEPAGE
        try:
            mm.madvise(advice, 0, max_size)
        except OSError as exc:
            if exc.errno != _errno.EINVAL:  # EINVAL: kernel without THP; nothing to ask
                raise os_error(where, exc, syscalls.advice_name(advice), 0, max_size) from None
    return MappedBacking(mm, fd, hugetlb, page_size, got.created, got.file_id, got.registered)


def _open_file(got: _Acquired, name: str, path: str, readonly: bool, allow_existing: bool) -> None:
    """Open, lock and check the backing file (see ``path`` of RamBlock)."""
    what = f"RamBlock {name!r}: backing file"
    opened = fileio.open_backing(path, what, readonly=readonly)
    got.fd = opened.fd
    try:
        fcntl.flock(opened.fd, (fcntl.LOCK_SH if readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (_errno.EWOULDBLOCK, _errno.EAGAIN):
            raise HostMemoryError(
                _errno.EBUSY, f"{what} {path!r} is in use by another machine (locked); left untouched"
            ) from None
        raise syscalls.error(exc.errno or _errno.EIO, f"flock of {path!r}") from None
    # Only a file we created and hold the lock on is ours to remove on failure.
    got.created = opened.created
    got.file_id = opened.fid
    size = os.fstat(opened.fd).st_size
    if not allow_existing and not opened.created and size > 0:
        raise fileio.ExistingData(
            f"{what} {path!r} exists and holds {size} bytes; refusing to discard its contents; left untouched"
        )
    fileio.register_guest_memory(opened.fd, name)
    got.registered = True
