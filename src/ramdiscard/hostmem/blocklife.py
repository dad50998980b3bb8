"""Resizing and closing a :class:`~ramdiscard.hostmem.RamBlock`.

:class:`BlockLifetime` is a mixin of ``RamBlock`` (it holds no state of its own):
``resize`` (shrinking discards the tail first, then the view is replaced and the resize
hooks run) and ``close`` (idempotent; never unmaps memory under a live derived view). The
contracts are those stated in :mod:`ramdiscard.hostmem.ramblock`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Self

from ramdiscard import fileio
from ramdiscard.errors import InvalidArgument
from ramdiscard.hostmem.blockaccess import BlockAccess


class BlockLifetime(BlockAccess):
    """Resize and close of a RamBlock (see the module docstring); the methods it calls
    but does not define are RamBlock's."""

    __slots__ = ()

    if TYPE_CHECKING:

        def discard_range(self, offset: int, length: int) -> None: ...
        def _set_limits(self) -> None: ...
        def _make_view(self, size: int) -> memoryview: ...

    # ---- resize and close ---------------------------------------------------------------

    def resize(self: Self, new_size: int) -> None:
        """Change the used length to ``new_size`` (a positive multiple of the page size,
        at most :attr:`max_size`). Shrinking discards the tail first, so a later grow
        exposes zeros. Then :attr:`view` is replaced (the old one is released) and each
        hook in :attr:`resize_hooks` is called with ``(block, old_size, new_size)``.

        Raises :class:`InvalidArgument` (nothing changed), or the discard's errors (the
        size is unchanged then; the tail may be partly discarded).
        """
        old = self._size
        if self._closed or new_size <= 0 or new_size > self._max_size or new_size & self._page_mask:
            where = f"{self._label()}: resize from {old:#x} to {new_size:#x}"
            if self._closed:
                raise InvalidArgument(f"{where}: block is closed")
            raise InvalidArgument(
                f"{where}: new size must be a positive multiple of {self._page_size:#x} "
                f"not above max_size {self._max_size:#x}; nothing changed"
            )
        if self._readonly and new_size < old:
            raise self._readonly_error("resize (tail discard)", new_size, old - new_size)
        if new_size == old:
            return
        if new_size < old:
            self.discard_range(new_size, old - new_size)
        self._size = new_size
        self._set_limits()
        self._drop_view()
        self._view = self._make_view(new_size)
        for hook in list(self.resize_hooks):
            hook(self, old, new_size)

    def _drop_view(self) -> None:
        view, self._view = self._view, None
        if view is not None:
            # BufferError: someone holds a buffer exported from our view (numpy, ctypes);
            # it keeps the memory alive, and dropping our reference is all we can do.
            with contextlib.suppress(BufferError):
                view.release()

    def _release(self) -> None:
        self._drop_view()
        self._madvise = None
        mm, self._mm = self._mm, None
        if mm is not None:
            # BufferError: views derived from ours are alive. They reference the mmap
            # object, which unmaps when the last of them is released: nothing leaks and
            # nothing dangles.
            with contextlib.suppress(BufferError):
                mm.close()
        if self._registered and self._file_id is not None:
            self._registered = False
            fileio.unregister_guest_memory(self._file_id, self._name)
        if self._fd_finalizer is not None:
            self._fd_finalizer()
            self._fd_finalizer = None
        self._fd = None

    def close(self) -> None:
        """Unmap the block and close its file descriptor. Idempotent.

        The memory is freed now, unless views derived from :attr:`view` are still alive:
        then the mapping (and its memory) lives until the last of them is released, while
        the block itself is closed and its fd is closed at once.
        """
        if self._closed:
            return
        self._closed = True
        self._set_limits()
        self._release()
