"""RamBlock: one contiguous mapping of real host memory that can be discarded and populated.

Theory of operation
===================

A block reserves ``max_size`` bytes of address space at creation and exposes the first
``size`` bytes (the *used length*, QEMU's ``used_length``). Reserving costs no memory:
memory is consumed only by populating (``populate``, or touching the bytes) and given back
by discarding (``discard_range``). After a discard the range reads as zeros and the host
holds no memory for it.

Which primitive frees memory depends on the backing, because the same call does not free
memory everywhere (``host-limits.md``, surprise 3):

=====================  ==========================  ========================================
backing                mapping                     discard primitive
=====================  ==========================  ========================================
``anonymous``          private, ``MAP_NORESERVE``  ``madvise(MADV_DONTNEED)``: drops the
                       (+ ``MADV_HUGEPAGE`` if      private pages; the range refaults as
                       ``thp``)                    zero-filled memory.
``memfd``              shared memfd (4 KiB or      ``fallocate(PUNCH_HOLE | KEEP_SIZE)``:
                       hugetlb pages)              ``MADV_DONTNEED`` would only unmap the
                                                   pages and leave them in the page cache.
``file``               shared mapping of a file    same punch; the file keeps its size.
                       on tmpfs or hugetlbfs
=====================  ==========================  ========================================

Populate is one ``madvise(MADV_POPULATE_WRITE)`` (or ``POPULATE_READ``), which faults the
range in and fails cleanly (an errno, not a SIGBUS) when memory cannot be had. Kernels
before 5.14 lack it; then a populate touches one byte per page instead (read, or read and
write back the same value), which is as fast but not safe against a concurrent writer and,
on hugetlb, dies with SIGBUS rather than failing.

Guarantees
==========

* Every range argument is checked before anything happens: offset and length must be
  non-negative multiples of :attr:`RamBlock.page_size` and the range must lie inside the
  used length. Violations raise :class:`~ramdiscard.errors.InvalidArgument` naming the
  block and the range; nothing changed. A closed block rejects everything the same way.
* A read-only block (``file`` backing, ``readonly=True``) refuses discard, write-populate
  and writes with :class:`~ramdiscard.errors.HostMemoryError` (``EROFS``) naming the range;
  nothing changed.
* Each effectful call passes :func:`ramdiscard.faults.checkpoint` first (``Op.DISCARD``,
  ``Op.POPULATE``, ``Op.MMAP``), so an injected fault leaves the block exactly as it was.
* A kernel failure raises :class:`~ramdiscard.errors.HostMemoryError` with the errno and
  the range. A failed populate may have populated a prefix of the range; discarding the
  same range always restores the previous memory use (the data in it is lost, as with any
  discard).
* Per-call overhead on the hot paths is a few integer tests plus the syscall; nothing
  loops over pages in Python.

Hugetlb blocks map with ``MAP_NORESERVE``: huge pages are taken from the pool when
populated, not when mapped, so an exhausted pool surfaces as a populate error. Touching an
unpopulated hugetlb page through :attr:`RamBlock.view` when the pool is empty kills the
process with SIGBUS (the kernel's choice, it cannot be caught): populate first.
:meth:`RamBlock.read` and :meth:`RamBlock.write` do that for you.

Lifetime of views
=================

:attr:`RamBlock.view` is a memoryview owned by the block. :meth:`RamBlock.close` and
:meth:`RamBlock.resize` release it, after which using that object raises ``ValueError``.
Views *derived* from it (slices, ``memoryview(block.view)``, numpy arrays over it) are
memory-safe: they keep the mapping alive, and the mapping is unmapped when the last of them
is released. ``close`` never unmaps memory under a live view and never fails because of
one; it closes the block's file descriptor immediately either way.

Code layout: this module holds construction, properties, discard and populate (the hot
paths); :mod:`ramdiscard.hostmem.blockaccess` the error messages and byte access
(``read``, ``write``, ``resident_bytes``); :mod:`ramdiscard.hostmem.blocklife`
``resize`` and ``close``. ``RamBlock`` inherits the latter two as mixins.

Blocks are not thread-safe against :meth:`RamBlock.close` or :meth:`RamBlock.resize`
running concurrently with other calls; discards and populates of disjoint ranges may run
from several threads.
"""

from __future__ import annotations

import errno as _errno
import itertools
import mmap
import os
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Final

from ramdiscard import faults, fileio
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.faults import Op
from ramdiscard.hostmem import syscalls
from ramdiscard.hostmem.backing import BASE_PAGE, Backing, close_fd, map_backing
from ramdiscard.hostmem.blocklife import BlockLifetime
from ramdiscard.units import format_size

ResizeHook = Callable[["RamBlock", int, int], None]
"""Called as ``hook(block, old_size, new_size)`` after a resize took effect."""

_BASE_PAGE: Final = BASE_PAGE
_MADV_DONTNEED: Final = syscalls.MADV_DONTNEED
_MADV_POPULATE_READ: Final = syscalls.MADV_POPULATE_READ
_MADV_POPULATE_WRITE: Final = syscalls.MADV_POPULATE_WRITE
_OP_DISCARD: Final = Op.DISCARD
_OP_POPULATE: Final = Op.POPULATE
_checkpoint: Final = faults.checkpoint

# None: not known yet; probed the first time a populate fails with EINVAL.
_populate_supported: bool | None = None

_names = itertools.count()


def _probe_populate() -> bool:
    """Whether this kernel knows MADV_POPULATE_READ (5.14+), tested on a scratch page."""
    global _populate_supported
    if _populate_supported is None:
        with mmap.mmap(-1, _BASE_PAGE) as scratch:
            try:
                scratch.madvise(syscalls.MADV_POPULATE_READ, 0, _BASE_PAGE)
            except OSError:
                _populate_supported = False
            else:
                _populate_supported = True
    return _populate_supported


class RamBlock(BlockLifetime):
    """A mapping of ``size`` bytes (up to ``max_size``) of real host memory.

    ``RamBlock(size, backing="anonymous" | "memfd" | "file", *, path=None, hugepages=False,
    thp=True, max_size=None, readonly=False, name=None)``

    * ``size``: used length in bytes, a positive multiple of the page size.
    * ``backing``: a :class:`Backing` or its string value.
    * ``path``: the file for ``file`` backing (required there, refused otherwise). It is
      created (mode 0600) if missing and extended (never shrunk) to ``max_size``; it is
      not deleted by :meth:`close` (:attr:`created` tells whether this block created it).
      It should live on tmpfs or hugetlbfs; other filesystems work if they support hole
      punching, but then memory means page cache. A path that is not a regular file (FIFO,
      device node, directory, ...) is refused (:class:`~ramdiscard.fileio.FileRefused`)
      without being opened. The block holds an advisory lock on the file (``flock``:
      exclusive, shared when ``readonly``) while open; a file locked by another block, in
      this or another process, is refused with :class:`HostMemoryError` (``EBUSY``) and
      left untouched. While the block is open, :mod:`ramdiscard.fileio` refuses the file
      as an output.
    * ``allow_existing_data``: ``file`` only: with ``False`` an existing file that is not
      empty is refused (:class:`~ramdiscard.fileio.ExistingData`, an
      :class:`InvalidArgument`, naming the path and its size) and left untouched.
    * ``hugepages``: ``memfd`` only: take pages from the hugetlb pool (``MFD_HUGETLB``). For
      ``file`` it is implied by a hugetlbfs path and refused for any other filesystem.
    * ``thp``: ``anonymous`` only: ask for transparent huge pages (``MADV_HUGEPAGE``); with
      ``False`` the block is marked ``MADV_NOHUGEPAGE`` so it stays on 4 KiB pages.
    * ``max_size``: address space reserved for :meth:`resize`; defaults to ``size``.
    * ``readonly``: ``file`` only: open and map the file read-only. The file must already
      hold ``max_size`` bytes.
    * ``name``: a label used in error messages and as the memfd name.

    Raises :class:`InvalidArgument` for inconsistent arguments (nothing created) and
    :class:`HostMemoryError` when the kernel refuses the memfd, file or mapping (anything
    acquired so far is released again; a ``file`` may remain created or extended).
    """

    __slots__ = ()

    def __init__(
        self,
        size: int,
        backing: Backing | str = Backing.ANONYMOUS,
        *,
        path: str | os.PathLike[str] | None = None,
        hugepages: bool = False,
        thp: bool = True,
        max_size: int | None = None,
        readonly: bool = False,
        name: str | None = None,
        allow_existing_data: bool = True,
    ) -> None:
        try:
            kind = Backing(backing)
        except ValueError:
            choices = ", ".join(b.value for b in Backing)
            raise InvalidArgument(f"unknown backing {backing!r}; expected one of {choices}") from None
        self._backing = kind
        self._name = name if name is not None else f"{kind.value}{next(_names)}"
        self._closed = True  # until fully constructed: close() and __del__ stay harmless
        self._fd: int | None = None
        self._fd_finalizer: weakref.finalize[[int], RamBlock] | None = None
        self._mm: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._host_address = 0
        self._hugetlb = False
        self._size = 0
        # Hot-path bounds: the end a range may reach for reads (_limit) and for changes
        # (_wlimit); -1 rejects every range, which is how closed and read-only blocks
        # cost no extra test.
        self._limit = -1
        self._wlimit = -1
        self._madvise: Callable[[int, int, int], None] | None = None
        self._readonly = readonly
        self._thp = thp and kind is Backing.ANONYMOUS
        self._path = os.fspath(path) if path is not None else None
        self._created = False
        self._registered = False
        self._file_id: fileio.FileId | None = None
        self.resize_hooks: list[ResizeHook] = []

        if kind is Backing.FILE:
            if self._path is None:
                raise InvalidArgument(f"RamBlock {self._name!r}: file backing needs a path")
        elif self._path is not None:
            raise InvalidArgument(f"RamBlock {self._name!r}: path is only valid for file backing")
        if readonly and kind is not Backing.FILE:
            raise InvalidArgument(f"RamBlock {self._name!r}: readonly is only valid for file backing")
        if hugepages and kind is Backing.ANONYMOUS:
            raise InvalidArgument(
                f"RamBlock {self._name!r}: hugetlb pages need memfd or file backing "
                "(anonymous blocks use transparent huge pages via thp=True)"
            )
        if max_size is None:
            max_size = size
        if size <= 0 or max_size < size:
            raise InvalidArgument(
                f"RamBlock {self._name!r}: need 0 < size <= max_size, got size={size:#x}, "
                f"max_size={max_size:#x}"
            )

        mapped = map_backing(
            self._name,
            kind,
            path=self._path,
            size=size,
            max_size=max_size,
            hugepages=hugepages,
            thp=self._thp,
            readonly=readonly,
            allow_existing=allow_existing_data,
        )
        # From here on the block owns what map_backing acquired; nothing below raises.
        if mapped.fd is not None:
            self._fd = mapped.fd
            self._fd_finalizer = weakref.finalize(self, close_fd, mapped.fd)
        self._created = mapped.created
        self._file_id = mapped.file_id
        self._registered = mapped.registered
        self._hugetlb = mapped.hugetlb
        self._page_size = mapped.page_size
        self._page_mask = mapped.page_size - 1
        self._size = size
        self._max_size = max_size
        mm = mapped.mm
        self._mm = mm
        self._madvise = mm.madvise
        self._punch = mapped.fd is not None
        self._host_address = syscalls.buffer_address(mm)
        self._view = self._make_view(size)
        self._closed = False
        self._set_limits()

    # ---- construction -------------------------------------------------------------------

    def _set_limits(self) -> None:
        self._limit = -1 if self._closed else self._size
        self._wlimit = -1 if self._closed or self._readonly else self._size

    def _make_view(self, size: int) -> memoryview:
        assert self._mm is not None
        with memoryview(self._mm) as whole:
            return whole[:size]

    # ---- properties ---------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Used length in bytes."""
        return self._size

    @property
    def max_size(self) -> int:
        """Reserved length in bytes; :meth:`resize` can grow the used length up to it."""
        return self._max_size

    @property
    def backing(self) -> Backing:
        return self._backing

    @property
    def page_size(self) -> int:
        """Granularity of discard/populate: 4 KiB, or the huge page size for hugetlb."""
        return self._page_size

    @property
    def hugetlb(self) -> bool:
        """Whether the block's pages come from the hugetlb pool."""
        return self._hugetlb

    @property
    def thp(self) -> bool:
        """Whether transparent huge pages were requested (anonymous blocks only)."""
        return self._thp

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def name(self) -> str:
        return self._name

    @property
    def host_address(self) -> int:
        """Address of the first byte of the mapping in this process."""
        self._check_open()
        return self._host_address

    @property
    def view(self) -> memoryview:
        """Memoryview of the used length (read-only for read-only blocks). Owned by the
        block: released by :meth:`close` and :meth:`resize` (see the module docstring)."""
        self._check_open()
        assert self._view is not None
        return self._view

    @property
    def fd(self) -> int | None:
        """The memfd or file descriptor, or None for anonymous memory or once closed."""
        return self._fd

    @property
    def path(self) -> str | None:
        return self._path

    @property
    def created(self) -> bool:
        """Whether this block created its backing file (``file`` backing only)."""
        return self._created

    @property
    def file_id(self) -> fileio.FileId | None:
        """(st_dev, st_ino) of the backing file (``file`` backing only)."""
        return self._file_id

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"at {self._host_address:#x}"
        huge = ", hugetlb" if self._hugetlb else ""
        return f"<RamBlock {self._name!r} {self._backing.value}{huge} {format_size(self._size)} {state}>"

    # ---- discard / populate -------------------------------------------------------------

    def discard_range(self, offset: int, length: int) -> None:
        """Free the memory of ``[offset, offset+length)``; afterwards it reads as zeros.

        Preconditions: block open and writable, offset and length non-negative multiples of
        :attr:`page_size`, range within :attr:`size`. A zero length is a no-op. Raises
        :class:`InvalidArgument` or, for a read-only block, :class:`HostMemoryError`
        (``EROFS``) with nothing changed; :class:`HostMemoryError` if the kernel refuses.
        """
        if (
            (ol := offset | length) <= 0
            or ol & self._page_mask
            or offset + length > self._wlimit
            or not length
        ):
            err = self._refusal("discard", offset, length, write=True)
            if err is None:
                return
            raise err
        _checkpoint(_OP_DISCARD)
        if self._punch:
            try:
                syscalls.punch_hole(self._fd, offset, length)  # type: ignore[arg-type]
            except HostMemoryError as exc:
                code = exc.errno or _errno.EIO
                raise HostMemoryError(code, f"{self._label()}: {exc.strerror}") from None
        else:
            try:
                self._madvise(_MADV_DONTNEED, offset, length)  # type: ignore[misc]
            except OSError as exc:
                raise self._os_error(exc, "madvise(MADV_DONTNEED)", offset, length) from None

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        """Fault ``[offset, offset+length)`` in, for writing (default) or reading.

        Preconditions as for :meth:`discard_range` (a read populate is allowed on a
        read-only block). A zero length is a no-op. Raises :class:`InvalidArgument`,
        :class:`HostMemoryError` (``EROFS``) for a write populate of a read-only block, or
        :class:`HostMemoryError` when memory cannot be had (``ENOMEM``, or ``EFAULT`` when
        the hugetlb pool is exhausted). After a failure a prefix of the range may be
        populated; :meth:`discard_range` of the same range gives that memory back.
        """
        if (
            (ol := offset | length) < 0
            or ol & self._page_mask
            or offset + length > (self._wlimit if write else self._limit)
            or not length
        ):
            err = self._refusal("write populate" if write else "populate", offset, length, write)
            if err is None:
                return
            raise err
        _checkpoint(_OP_POPULATE)
        try:
            self._madvise(  # type: ignore[misc]
                _MADV_POPULATE_WRITE if write else _MADV_POPULATE_READ, offset, length
            )
        except OSError as exc:
            if exc.errno == _errno.EINVAL and not _probe_populate():
                self._touch(offset, length, write)
                return
            raise self._populate_error(exc, offset, length, write) from None

    def __enter__(self) -> RamBlock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
