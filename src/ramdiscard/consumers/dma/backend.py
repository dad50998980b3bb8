"""The DMA pinning contract shared by every backend.

Rules:

* A pin covers ``[host_address, host_address + size)``; both must be multiples of
  :data:`PAGE_SIZE` (4 KiB), ``size > 0``, and the range must fit in 64 bits.
* :meth:`DmaBackend.pin` is all-or-nothing: when it raises, nothing it did stays pinned.
* A :class:`PinHandle` is valid from the ``pin`` that returned it until the ``unpin`` that
  consumes it. Unknown, foreign or already-unpinned handles raise :class:`InvalidArgument`.
* Every argument error is raised before any effect, so "nothing changed" holds.
* :meth:`DmaBackend.close` releases everything (it is not a fault-injection point, since
  teardown must not half-fail) and is idempotent; any use after it raises
  :class:`BackendClosed`.
* Calls are serialised by one lock per backend, so a backend may be shared by threads.

Theory of operation: the base class owns validation and bookkeeping (live handles, bytes
still pinned); a subclass implements four hooks that perform the real effect:
``_pin_impl`` (must roll back on failure), ``_unpin_impl`` (may fail part-way; it then
reports what it released with :meth:`DmaBackend._note_released`, the handle stays valid
and a later ``unpin`` finishes the job), ``_dma_read_impl`` and ``_close_impl``.
``dma_read`` returns what a device would read through the pin. For a real pin (io_uring)
that is the pinned page frames, which may differ from what the CPU sees at the address
after the memory was discarded: the pin has gone stale.
"""

from __future__ import annotations

import itertools
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from types import TracebackType

from ramdiscard.consumers.dma.runs import (
    OWN,
    RELEASED,
    PinRun,
    check_span,
    generic_pin_run,
    generic_run_handle,
    generic_run_holds,
    generic_unpin_run,
)
from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import PinHandle as PinHandle

PAGE_SIZE = 4096
"""Granularity of pins: addresses and sizes must be multiples of this."""

_ADDRESS_LIMIT = 1 << 64
_PAGE_MASK = PAGE_SIZE - 1
_log = logging.getLogger("ramdiscard.consumers.dma")
_new = object.__new__

# Tokens are unique in the process, so a handle from another backend is never mistaken
# for one of ours.
_tokens = itertools.count(1)
next_token = _tokens.__next__
"""A fresh process-unique token (for subclasses' fast paths that build handles inline)."""


def new_handle(host_address: int, size: int) -> PinHandle:
    """A fresh handle with a process-unique token, for subclasses' fast paths (the
    arguments must be validated already)."""
    handle = _new(PinHandle)
    handle.__dict__.update(host_address=host_address, size=size, token=next(_tokens))
    return handle


class BackendClosed(InvalidArgument):
    """The backend was closed; it cannot pin, unpin or read any more."""


def _check_ranges(ranges: Sequence[tuple[int, int]]) -> None:
    for host_address, size in ranges:
        # The common valid case inline; check_range finds and reports any error.
        if not (
            type(host_address) is int
            and type(size) is int
            and host_address > 0
            and size > 0
            and not (host_address | size) & _PAGE_MASK
            and host_address + size <= _ADDRESS_LIMIT
        ):
            check_range(host_address, size)


def check_range(host_address: int, size: int) -> None:
    """Raise InvalidArgument unless ``[host_address, +size)`` is a valid pin range."""
    for name, value in (("host_address", host_address), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")
    if size <= 0:
        raise InvalidArgument(f"pin size must be positive, got {size}")
    if host_address <= 0:
        raise InvalidArgument(f"pin address must be positive, got {host_address:#x}")
    if host_address % PAGE_SIZE or size % PAGE_SIZE:
        raise InvalidArgument(f"pin [{host_address:#x}, +{size:#x}) is not aligned to {PAGE_SIZE} bytes")
    if host_address + size > _ADDRESS_LIMIT:
        raise InvalidArgument(f"pin [{host_address:#x}, +{size:#x}) overflows 64 bits")


class DmaBackend(ABC):
    """Pins host memory for DMA. Use as a context manager or call :meth:`close`."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._handles: dict[int, PinHandle] = {}
        # Bytes still pinned, only for handles a failed unpin released in part (the
        # others have all of their size pinned).
        self._remaining: dict[int, int] = {}
        self._pinned_bytes = 0
        # Pieces of run pins pinned without a handle of their own (backends that keep
        # a record per run: see _pin_run_impl).
        self._run_pieces = 0
        self._closed = False

    # -- public API -----------------------------------------------------------------

    def pin(self, host_address: int, size: int) -> PinHandle:
        """Pin ``size`` bytes at ``host_address``; afterwards the pages are resident and
        held until :meth:`unpin`. Raises InvalidArgument (nothing changed) or
        HostMemoryError (nothing left pinned)."""
        check_range(host_address, size)
        with self._lock:
            self._check_open()
            handle = PinHandle(host_address, size, next(_tokens))
            self._pin_impl(handle)
            self._handles[handle.token] = handle
            self._pinned_bytes += size
            return handle

    def unpin(self, handle: PinHandle) -> None:
        """Release ``handle``. On HostMemoryError part of it may be released already; the
        handle stays valid and a later call releases the rest."""
        with self._lock:
            self._check_open()
            self._check_handle(handle)
            self._unpin_impl(handle)
            self._pinned_bytes -= self._remaining.pop(handle.token, handle.size)
            del self._handles[handle.token]

    def pin_many(self, ranges: Sequence[tuple[int, int]]) -> list[PinHandle]:
        """Pin each ``(host_address, size)`` of ``ranges`` in order, one handle each.

        All-or-nothing: every range is validated first (InvalidArgument, nothing changed);
        if a pin fails, the pins this call made are released again and the error
        propagates. Equivalent to a loop of :meth:`pin`, with one lock acquisition and,
        in backends that override :meth:`_pin_many_impl`, less per-range overhead.
        """
        _check_ranges(ranges)
        with self._lock:
            self._check_open()
            if not ranges:
                return []
            return self._pin_many_impl(ranges)

    def pin_run(self, ranges: Sequence[tuple[int, int]]) -> PinRun:
        """Pin ``ranges`` as one :class:`~ramdiscard.consumers.dma.runs.PinRun` (piece
        ``i`` is ``ranges[i]``); validation, all-or-nothing and errors as :meth:`pin_many`.
        The rules of run pins are in :mod:`ramdiscard.consumers.dma.runs`."""
        _check_ranges(ranges)
        with self._lock:
            self._check_open()
            if not ranges:
                return PinRun(self, (), RELEASED)
            return self._pin_run_impl(ranges)

    def pin_run_checked(self, ranges: Sequence[tuple[int, int]]) -> PinRun:
        """:meth:`pin_run` of ranges the caller has already validated, for a consumer
        that checked them itself (the vfio container's granule cut of a registered
        section). Precondition, not checked again: every item is a pair of ``int`` with
        ``host_address > 0``, ``size > 0``, both multiples of :data:`PAGE_SIZE`, and
        ``host_address + size <= 2**64``; breaking it corrupts the accounting. Otherwise
        as :meth:`pin_run` (BackendClosed, all-or-nothing, faults, errors)."""
        with self._lock:
            if self._closed:
                self._check_open()
            if not ranges:
                return PinRun(self, (), RELEASED)
            return self._pin_run_impl(ranges)

    def unpin_run(self, run: PinRun, lo: int, hi: int) -> None:
        """Release the pieces ``[lo, hi)`` of ``run`` still pinned, in order (failure
        rules in :mod:`ramdiscard.consumers.dma.runs`)."""
        with self._lock:
            self._check_open()
            check_span(run, self, lo, hi)
            self._unpin_run_impl(run, lo, hi)

    def run_handle(self, run: PinRun, i: int) -> PinHandle:
        """The handle of piece ``i`` of ``run`` (made now if the backend kept none)."""
        with self._lock:
            self._check_open()
            check_span(run, self, i, i + 1)
            return self._run_handle_impl(run, i)

    def run_holds(self, run: PinRun, i: int) -> bool:
        """True while piece ``i`` of ``run`` is pinned."""
        if run.state[i] == OWN:
            return True
        return generic_run_holds(self, run, i)

    def unpin_many(self, handles: Sequence[PinHandle]) -> None:
        """Release ``handles`` in order. Every handle is checked first (InvalidArgument,
        nothing changed). If a release fails, the handles before it are released, it and
        the ones after stay valid (see :meth:`unpin`; :meth:`holds` tells which), and the
        error propagates."""
        with self._lock:
            self._check_open()
            live = self._handles
            for handle in handles:
                if type(handle) is not PinHandle or live.get(handle.token) is not handle:
                    self._check_handle(handle)
            if len({handle.token for handle in handles}) != len(handles):
                seen: set[int] = set()
                for handle in handles:
                    if handle.token in seen:
                        raise InvalidArgument(f"{handle!r} is listed twice")
                    seen.add(handle.token)
            self._unpin_many_impl(handles)

    def holds(self, handle: PinHandle) -> bool:
        """True while ``handle`` is a live pin of this backend."""
        return self._handles.get(handle.token) == handle

    def dma_read(self, handle: PinHandle, offset: int, length: int) -> bytes:
        """Return ``length`` bytes at ``offset`` into the pin, as a device doing DMA
        through this pin would read them."""
        for name, value in (("offset", offset), ("length", length)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")
        with self._lock:
            self._check_open()
            self._check_handle(handle)
            if offset < 0 or length < 0 or offset + length > handle.size:
                raise InvalidArgument(
                    f"dma_read [{offset:#x}, +{length:#x}) is outside the pin of {handle.size:#x} bytes"
                )
            if length == 0:
                return b""
            return self._dma_read_impl(handle, offset, length)

    @property
    def pinned_bytes(self) -> int:
        """Bytes currently pinned through this backend (overlapping pins count twice)."""
        return self._pinned_bytes

    @property
    def pin_count(self) -> int:
        """Number of live pins: handles, and pieces of run pins still pinned."""
        return len(self._handles) + self._run_pieces

    @property
    def closed(self) -> bool:
        return self._closed

    def handles(self) -> list[PinHandle]:
        """The live handles, oldest first (pieces of run pins get theirs now)."""
        with self._lock:
            self._materialize_runs()
            return list(self._handles.values())

    def close(self) -> None:
        """Unpin everything and release the backend's resources. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._close_impl()
            finally:
                self._handles.clear()
                self._remaining.clear()
                self._pinned_bytes = 0
                self._run_pieces = 0

    def __enter__(self) -> DmaBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- for subclasses -------------------------------------------------------------

    def _pin_many_impl(self, ranges: Sequence[tuple[int, int]]) -> list[PinHandle]:
        """Pin validated, non-empty ``ranges`` all-or-nothing, with the lock held.
        The default runs :meth:`_pin_impl` per range and unpins on failure."""
        done: list[PinHandle] = []
        try:
            for host_address, size in ranges:
                handle = PinHandle(host_address, size, next(_tokens))
                self._pin_impl(handle)
                self._handles[handle.token] = handle
                self._pinned_bytes += size
                done.append(handle)
        except BaseException:
            for handle in reversed(done):
                try:
                    self.unpin(handle)
                except Exception:
                    _log.exception("rollback of %r failed; it stays pinned", handle)
            raise
        return done

    def _unpin_many_impl(self, handles: Sequence[PinHandle]) -> None:
        """Release checked ``handles`` in order, with the lock held."""
        for handle in handles:
            self._unpin_impl(handle)
            self._pinned_bytes -= self._remaining.pop(handle.token, handle.size)
            del self._handles[handle.token]

    def _pin_run_impl(self, ranges: Sequence[tuple[int, int]]) -> PinRun:
        """Pin validated, non-empty ``ranges`` as a run, with the lock held. The default
        holds one handle per piece."""
        return generic_pin_run(self, ranges)

    def _unpin_run_impl(self, run: PinRun, lo: int, hi: int) -> None:
        """Release the pieces ``[lo, hi)`` still pinned (checked), with the lock held."""
        generic_unpin_run(self, run, lo, hi)

    def _run_handle_impl(self, run: PinRun, i: int) -> PinHandle:
        return generic_run_handle(self, run, i)

    def _materialize_runs(self) -> None:
        """Give every piece of a run pin that has no handle one (for :meth:`handles`);
        nothing to do where every piece has one from the start."""
        return

    def _note_released(self, handle: PinHandle, nbytes: int) -> None:
        """Record that ``nbytes`` of ``handle`` were released by a failing ``_unpin_impl``."""
        self._remaining[handle.token] = self._remaining.get(handle.token, handle.size) - nbytes
        self._pinned_bytes -= nbytes

    @abstractmethod
    def _pin_impl(self, handle: PinHandle) -> None:
        """Pin the handle's range; on failure undo everything done and raise."""

    @abstractmethod
    def _unpin_impl(self, handle: PinHandle) -> None:
        """Release the handle's range (what is still pinned of it)."""

    @abstractmethod
    def _dma_read_impl(self, handle: PinHandle, offset: int, length: int) -> bytes:
        """Read through the pin; arguments are already validated and non-empty."""

    @abstractmethod
    def _close_impl(self) -> None:
        """Release every live pin and all resources, without fault checkpoints."""

    # -- helpers --------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise BackendClosed(f"{type(self).__name__} is closed")

    def _check_handle(self, handle: PinHandle) -> None:
        if not isinstance(handle, PinHandle):
            raise InvalidArgument(f"expected a PinHandle, got {type(handle).__name__}")
        if self._handles.get(handle.token) != handle:
            raise InvalidArgument(f"{handle!r} is not a live pin of this {type(self).__name__}")
