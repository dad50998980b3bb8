"""The error reporting and byte access half of :class:`~ramdiscard.hostmem.RamBlock`.

:class:`BlockAccess` is a mixin of ``RamBlock`` (it holds no state of its own): the
messages every refused call raises (naming the block, the range and the reason, ending
in "nothing changed"), the populate fallback for kernels without ``MADV_POPULATE_*``,
``resident_bytes``, ``read`` and ``write``. The contracts are those stated in
:mod:`ramdiscard.hostmem.ramblock`.
"""

from __future__ import annotations

import errno as _errno
import mmap
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Self

from ramdiscard import fileio
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.hostmem import measure, syscalls
from ramdiscard.hostmem.backing import BASE_PAGE, Backing, label, os_error
from ramdiscard.hostmem.syscalls import describe_range
from ramdiscard.units import format_size

_BASE_PAGE: Final = BASE_PAGE


class BlockAccess:
    """Error helpers and byte access of a RamBlock (see the module docstring); also
    declares the slots of every RamBlock attribute, so the mixins share one layout."""

    __slots__ = (
        "__weakref__",
        "_backing",
        "_closed",
        "_created",
        "_fd",
        "_fd_finalizer",
        "_file_id",
        "_host_address",
        "_hugetlb",
        "_limit",
        "_madvise",
        "_max_size",
        "_mm",
        "_name",
        "_page_mask",
        "_page_size",
        "_path",
        "_punch",
        "_readonly",
        "_registered",
        "_size",
        "_thp",
        "_view",
        "_wlimit",
        "resize_hooks",
    )

    _backing: Backing
    _closed: bool
    _created: bool
    _fd: int | None
    _fd_finalizer: weakref.finalize[[int], Self] | None
    _file_id: fileio.FileId | None
    _host_address: int
    _hugetlb: bool
    _limit: int
    _madvise: Callable[[int, int, int], None] | None
    _max_size: int
    _mm: mmap.mmap | None
    _name: str
    _page_mask: int
    _page_size: int
    _path: str | None
    _punch: bool
    _readonly: bool
    _registered: bool
    _size: int
    _thp: bool
    _view: memoryview | None
    _wlimit: int
    resize_hooks: list[Callable[[Self, int, int], None]]

    if TYPE_CHECKING:

        def populate(self, offset: int, length: int, *, write: bool = True) -> None: ...

    # ---- errors -------------------------------------------------------------------------

    def _label(self) -> str:
        return label(self._name, self._backing, self._hugetlb)

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument(f"{self._label()} is closed")

    def _range_error(self, op: str, offset: int, length: int, align: int) -> InvalidArgument:
        """Explain why ``[offset, offset+length)`` is not acceptable for ``op``."""
        where = f"{self._label()}: {op} of {describe_range(offset, length)}"
        if self._closed:
            reason = "block is closed"
        elif offset < 0 or length < 0:
            reason = "offset and length must be non-negative"
        elif offset % align or length % align:
            reason = f"offset and length must be multiples of the page size {align:#x}"
        else:
            reason = f"range exceeds the used length {self._size:#x}"
        return InvalidArgument(f"{where}: {reason}; nothing changed")

    def _refusal(
        self, op: str, offset: int, length: int, write: bool
    ) -> InvalidArgument | HostMemoryError | None:
        """The error for a discard or populate the hot-path test sent here, or None for a
        valid zero-length call (a no-op: ``mmap.madvise`` rejects a start at the end)."""
        if (
            self._closed
            or offset < 0
            or length < 0
            or (offset | length) & self._page_mask
            or offset + length > self._size
        ):
            return self._range_error(op, offset, length, self._page_size)
        if write and self._readonly:
            return self._readonly_error(op, offset, length)
        return None

    def _readonly_error(self, op: str, offset: int, length: int) -> HostMemoryError:
        return HostMemoryError(
            _errno.EROFS,
            f"{self._label()}: {op} of {describe_range(offset, length)} refused: the block "
            f"maps {self._path!r} read-only; nothing changed",
        )

    def _os_error(self, exc: OSError, op: str, offset: int, length: int) -> HostMemoryError:
        return os_error(self._label(), exc, op, offset, length)

    def _populate_error(self, exc: OSError, offset: int, length: int, write: bool) -> HostMemoryError:
        op = "madvise(MADV_POPULATE_WRITE)" if write else "madvise(MADV_POPULATE_READ)"
        err = self._os_error(exc, op, offset, length)
        if self._hugetlb:
            pool = measure.hugepage_pool()
            hint = f"; hugetlb pool: {pool.free} of {pool.total} pages of {format_size(pool.page_size)} free"
            if pool.free == 0:
                hint += " (exhausted)"
            err = HostMemoryError(err.errno or _errno.EIO, f"{err.strerror}{hint}")
        return err

    def _touch(self, offset: int, length: int, write: bool) -> None:
        """Populate without MADV_POPULATE_*: read (and write back) one byte per page."""
        assert self._mm is not None
        with memoryview(self._mm) as whole, whole[offset : offset + length : _BASE_PAGE] as pages:
            if write:
                pages[:] = pages.tobytes()
            else:
                pages.tobytes()

    # ---- observation and data access ----------------------------------------------------

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Bytes of ``[offset, offset+length)`` (default: the used length) that the host
        holds in memory, by ``mincore``: base pages for anonymous memory, page-cache pages
        for shared mappings. Range must be 4 KiB aligned and within the used length."""
        if length is None:
            length = self._size - offset
        if (
            self._closed
            or offset < 0
            or length < 0
            or offset + length > self._size
            or (offset | length) & (_BASE_PAGE - 1)
        ):
            raise self._range_error("resident_bytes", offset, length, _BASE_PAGE)
        return syscalls.resident_pages(self._host_address + offset, length) * _BASE_PAGE

    def _check_bytes(self, op: str, offset: int, length: int) -> None:
        if self._closed or offset < 0 or length < 0 or offset + length > self._size:
            raise self._range_error(op, offset, length, 1)

    def _prefault_hugetlb(self, offset: int, length: int, write: bool) -> None:
        # An unpopulated hugetlb page faulted by a plain access is a SIGBUS when the pool
        # is empty; a populate turns that into an exception.
        if length:
            start = offset & ~self._page_mask
            end = (offset + length + self._page_mask) & ~self._page_mask
            self.populate(start, end - start, write=write)

    def read(self, offset: int, length: int) -> bytes:
        """Copy of ``length`` bytes at ``offset`` (any byte alignment, within the used
        length). On hugetlb blocks the covering pages are populated first."""
        self._check_bytes("read", offset, length)
        if self._hugetlb:
            self._prefault_hugetlb(offset, length, write=False)
        return self._mm[offset : offset + length]  # type: ignore[index]

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset`` (any byte alignment, within the used length).
        Raises :class:`HostMemoryError` (``EROFS``) on a read-only block. On hugetlb blocks
        the covering pages are populated first."""
        length = len(data) if not isinstance(data, memoryview) else data.nbytes
        self._check_bytes("write", offset, length)
        if self._readonly:
            raise self._readonly_error("write", offset, length)
        if self._hugetlb:
            self._prefault_hugetlb(offset, length, write=True)
        self._mm[offset : offset + length] = data  # type: ignore[index]
