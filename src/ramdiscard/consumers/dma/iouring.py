"""DMA pinning through io_uring fixed buffers: real page pins, accounted in VmPin.

Rules:

* A pin is one or more io_uring *fixed buffers*. The kernel pins the pages of a
  registered buffer (FOLL_PIN, like VFIO) until it is unregistered. A buffer holds at
  most :data:`MAX_BUFFER_BYTES` (1 GiB) and a ring at most :data:`MAX_BUFFERS_PER_RING`
  (16384) buffers, so a large pin takes several slots and many pins take several rings.
* Each ring has a sparse buffer table of all its slots, registered once
  (``IORING_REGISTER_BUFFERS2`` + ``IORING_RSRC_REGISTER_SPARSE``); a pin fills slots and
  an unpin empties them with ``IORING_REGISTER_BUFFERS_UPDATE`` (an empty iovec
  unregisters a slot). Free slots are reused lowest first, in the lowest ring that has
  one; a new ring is created only when every ring is full. Rings stay until close.
* Ring size: registering a buffer on a transparent huge page makes the kernel walk the
  ring's whole buffer table (to charge each huge page once), so a THP pin costs more the
  bigger the table and the fuller it is. Measured per 2 MiB THP buffer on 6.18 (empty /
  half-full table): 256 slots 3.8 / 3.9 us, 512: 4.2 / 4.5, 1024: 4.5 / 5.2, 4096: 7.1 /
  12.6, 16384: 17 / 55. :data:`DEFAULT_SLOTS_PER_RING` (512) stays within ~15% of the
  cheapest while the 65535 mappings of vfio's default ``dma_entry_limit`` need at most
  128 rings (one fd and two small mappings each). Pins on 4 KiB pages do no such walk.
* A pin of several buffers registers each run of consecutive slots with one
  ``BUFFERS_UPDATE`` of several iovecs; the kernel stops at the first failing one and
  reports how many it did, and the backend then rolls those back.
* Every slot fill passes ``faults.checkpoint(Op.PIN)`` and every slot release
  ``faults.checkpoint(Op.UNPIN)`` before its syscall; a batch passes all of its
  checkpoints first (a PIN fault then pins nothing; an UNPIN fault at the i-th handle
  releases the ones before it). Creating a ring (also in the middle of a pin, when every
  ring is full) passes ``faults.checkpoint(Op.MMAP)``. A failed pin releases the slots it
  filled (the rollback is no fault point). A failed unpin keeps the handle with the slots
  still registered; a retry releases the rest.
* ``dma_read`` submits a real ``IORING_OP_WRITE_FIXED`` from the registered buffer into a
  private memfd and reads that back, so it shows what the pinned page frames hold. After
  a discard (``MADV_DONTNEED``, ``PUNCH_HOLE``) of pinned memory the CPU sees fresh zero
  pages while the pin still holds, and DMA still reads, the old frames: the pin is
  stale, and the old memory is freed only at unpin.
* Accounting: the kernel charges ``mm->pinned_vm`` (``VmPin``), not ``VmLck``; without
  CAP_IPC_LOCK it also charges RLIMIT_MEMLOCK, and an over-limit pin fails with ENOMEM.
  A buffer on a transparent huge page is charged the whole huge page (once per ring), so
  ``VmPin`` can exceed :attr:`pinned_bytes` on THP memory; on 4 KiB pages they agree.

Theory of operation: :class:`RawRing` is the thin syscall layer (setup, the two register
calls, one-shot submission of a WRITE_FIXED through the mmapped SQ/CQ rings); it keeps no
bookkeeping and is also the benchmarks' "raw baseline". :class:`IoUringDmaBackend` adds
slot allocation, splitting, rollback and the :class:`DmaBackend` contract on top. The ring
memory is shared with the kernel and written with plain stores: on x86-64 (the only
architecture whose syscall numbers are used here) stores are not reordered with other
stores, and the ``io_uring_enter`` syscall orders them before the kernel reads the tail.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import mmap
import os
import platform
import struct
from array import array
from collections.abc import Sequence
from functools import lru_cache
from itertools import chain
from operator import itemgetter
from types import TracebackType
from typing import NamedTuple

from ramdiscard import faults
from ramdiscard.consumers.dma.backend import PAGE_SIZE, DmaBackend, PinHandle, new_handle
from ramdiscard.errors import HostMemoryError, InvalidArgument

MAX_BUFFER_BYTES = 1 << 30
"""Largest single fixed buffer the kernel accepts (1 GiB + 4 KiB fails with EFAULT)."""
MAX_BUFFERS_PER_RING = 16384
"""Largest buffer table of one ring (16385 fails with EINVAL)."""
DEFAULT_SLOTS_PER_RING = 512
"""Buffer-table size of the backend's rings (see the module docstring for why)."""

# x86_64 syscall numbers and uapi constants from <linux/io_uring.h>.
_NR_IO_URING_SETUP = 425
_NR_IO_URING_ENTER = 426
_NR_IO_URING_REGISTER = 427
_IORING_OFF_SQ_RING = 0
_IORING_OFF_CQ_RING = 0x8000000
_IORING_OFF_SQES = 0x10000000
_IORING_FEAT_SINGLE_MMAP = 1 << 0
_IORING_ENTER_GETEVENTS = 1 << 0
_IORING_REGISTER_BUFFERS2 = 15
_IORING_REGISTER_BUFFERS_UPDATE = 16
_IORING_UNREGISTER_BUFFERS = 1
_IORING_RSRC_REGISTER_SPARSE = 1 << 0
_IORING_OP_WRITE_FIXED = 5
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe: user_data, res, flags
_U32 = struct.Struct("<I")
# One WRITE_FIXED moves at most this much; the kernel caps a read/write at 2 GiB - 4 KiB.
_MAX_IO = 1 << 30

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# A separately prototyped syscall() for io_uring_register: with argtypes set, ctypes
# converts plain ints itself, which saves ~1 µs per call on the pin/unpin hot path.
_register = _libc["syscall"]
_register.restype = ctypes.c_long
_register.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long]


class _SqringOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("dropped", ctypes.c_uint32),
        ("array", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _CqringOffsets(ctypes.Structure):
    _fields_ = [
        ("head", ctypes.c_uint32),
        ("tail", ctypes.c_uint32),
        ("ring_mask", ctypes.c_uint32),
        ("ring_entries", ctypes.c_uint32),
        ("overflow", ctypes.c_uint32),
        ("cqes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv1", ctypes.c_uint32),
        ("user_addr", ctypes.c_uint64),
    ]


class _Params(ctypes.Structure):
    _fields_ = [
        ("sq_entries", ctypes.c_uint32),
        ("cq_entries", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("sq_thread_cpu", ctypes.c_uint32),
        ("sq_thread_idle", ctypes.c_uint32),
        ("features", ctypes.c_uint32),
        ("wq_fd", ctypes.c_uint32),
        ("resv", ctypes.c_uint32 * 3),
        ("sq_off", _SqringOffsets),
        ("cq_off", _CqringOffsets),
    ]


class _RsrcRegister(ctypes.Structure):
    _fields_ = [
        ("nr", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resv2", ctypes.c_uint64),
        ("data", ctypes.c_uint64),
        ("tags", ctypes.c_uint64),
    ]


class _RsrcUpdate2(ctypes.Structure):
    _fields_ = [
        ("offset", ctypes.c_uint32),
        ("resv", ctypes.c_uint32),
        ("data", ctypes.c_uint64),
        ("tags", ctypes.c_uint64),
        ("nr", ctypes.c_uint32),
        ("resv2", ctypes.c_uint32),
    ]


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_uint64), ("iov_len", ctypes.c_uint64)]


_UPDATE_SIZE = ctypes.sizeof(_RsrcUpdate2)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise HostMemoryError(err, f"{what} failed: {os.strerror(err)}")
    return ret


class RawRing:
    """One io_uring instance driven by raw syscalls, with no bookkeeping.

    ``register_sparse(n)`` creates an empty n-slot buffer table, ``update(slot, addr, len)``
    registers (pins) or, with ``addr == len == 0``, unregisters one slot, and
    ``write_fixed`` runs one WRITE_FIXED to completion. Errors raise HostMemoryError.
    No fault checkpoints: this is the baseline the benchmarks compare against.
    """

    def __init__(self, entries: int = 4) -> None:
        params = _Params()
        fd = _check(
            _syscall(ctypes.c_long(_NR_IO_URING_SETUP), ctypes.c_long(entries), ctypes.byref(params)),
            f"io_uring_setup({entries})",
        )
        self.fd = fd
        self._maps: list[mmap.mmap] = []
        try:
            self._params = params
            sq, cq = params.sq_off, params.cq_off
            sq_size = sq.array + params.sq_entries * 4
            cq_size = cq.cqes + params.cq_entries * _CQE.size
            prot = mmap.PROT_READ | mmap.PROT_WRITE
            flags = mmap.MAP_SHARED | mmap.MAP_POPULATE
            if params.features & _IORING_FEAT_SINGLE_MMAP:
                sq_size = cq_size = max(sq_size, cq_size)
                self._sq_ring = mmap.mmap(fd, sq_size, flags, prot, offset=_IORING_OFF_SQ_RING)
                self._maps.append(self._sq_ring)
                self._cq_ring = self._sq_ring
            else:
                self._sq_ring = mmap.mmap(fd, sq_size, flags, prot, offset=_IORING_OFF_SQ_RING)
                self._maps.append(self._sq_ring)
                self._cq_ring = mmap.mmap(fd, cq_size, flags, prot, offset=_IORING_OFF_CQ_RING)
                self._maps.append(self._cq_ring)
            self._sqes = mmap.mmap(fd, params.sq_entries * _SQE.size, flags, prot, offset=_IORING_OFF_SQES)
            self._maps.append(self._sqes)
        except BaseException:
            self.close()
            raise
        self._sq_mask = _U32.unpack_from(self._sq_ring, sq.ring_mask)[0]
        self._cq_mask = _U32.unpack_from(self._cq_ring, cq.ring_mask)[0]
        self._user_data = 0
        self.slots = 0
        # One iovec and one update record per ring, reused by every update() call.
        self._iov = _Iovec()
        self._upd = _RsrcUpdate2(data=ctypes.addressof(self._iov), nr=1)
        self._upd_addr = ctypes.addressof(self._upd)
        self._upd_many = _RsrcUpdate2()
        self._upd_many_addr = ctypes.addressof(self._upd_many)

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def register_sparse(self, nr: int) -> None:
        """Register an empty buffer table of ``nr`` slots (once per ring)."""
        reg = _RsrcRegister(nr=nr, flags=_IORING_RSRC_REGISTER_SPARSE)
        _check(
            _syscall(
                ctypes.c_long(_NR_IO_URING_REGISTER),
                ctypes.c_long(self.fd),
                ctypes.c_long(_IORING_REGISTER_BUFFERS2),
                ctypes.byref(reg),
                ctypes.c_long(ctypes.sizeof(reg)),
            ),
            f"io_uring_register(BUFFERS2, sparse, nr={nr})",
        )
        self.slots = nr

    def update(self, slot: int, address: int, length: int) -> None:
        """Register ``[address, +length)`` in ``slot`` (pins it), replacing what was
        there; ``address == length == 0`` empties the slot (unpins)."""
        iov = self._iov
        iov.iov_base = address
        iov.iov_len = length
        self._upd.offset = slot
        if _register(_NR_IO_URING_REGISTER, self.fd, _IORING_REGISTER_BUFFERS_UPDATE,
                     self._upd_addr, _UPDATE_SIZE) < 0:  # fmt: skip
            _check(
                -1,
                f"io_uring_register(BUFFERS_UPDATE, slot={slot}, [{address:#x}, +{length:#x}))",
            )

    def update_many(self, first_slot: int, ranges: Sequence[tuple[int, int]]) -> int:
        """Register ``ranges[i]`` in slot ``first_slot + i`` with one ``BUFFERS_UPDATE``
        of ``nr = len(ranges)`` iovecs; a ``(0, 0)`` range empties its slot.

        Returns how many slots were updated. The kernel updates them in order and stops
        at the first failure; when some succeeded it returns only their count (the slots
        from ``first_slot + count`` on are unchanged), when the first one fails this
        raises HostMemoryError with its errno. ``ranges`` must not be empty.
        """
        iov = array("Q", chain.from_iterable(ranges))
        return self._submit_many(first_slot, len(ranges), iov)

    def release_many(self, first_slot: int, count: int) -> int:
        """Empty (unpin) ``count`` slots from ``first_slot`` with one ``BUFFERS_UPDATE``;
        same result contract as :meth:`update_many`."""
        return self._submit_many(first_slot, count, array("Q", bytes(16 * count)))

    def _submit_many(self, first_slot: int, count: int, iov: array[int]) -> int:
        upd = self._upd_many
        upd.offset = first_slot
        upd.data = iov.buffer_info()[0]
        upd.nr = count
        ret: int = _register(_NR_IO_URING_REGISTER, self.fd, _IORING_REGISTER_BUFFERS_UPDATE,
                             self._upd_many_addr, _UPDATE_SIZE)  # fmt: skip
        if ret < 0:
            _check(ret, f"io_uring_register(BUFFERS_UPDATE, slots [{first_slot}, +{count}))")
        return ret

    def unregister_all(self) -> None:
        """Drop the whole buffer table (every slot unpinned)."""
        _check(
            _syscall(
                ctypes.c_long(_NR_IO_URING_REGISTER),
                ctypes.c_long(self.fd),
                ctypes.c_long(_IORING_UNREGISTER_BUFFERS),
                ctypes.c_void_p(0),
                ctypes.c_long(0),
            ),
            "io_uring_register(UNREGISTER_BUFFERS)",
        )
        self.slots = 0

    def write_fixed(self, slot: int, address: int, length: int, fd: int, file_offset: int) -> int:
        """Write ``length`` bytes from registered buffer ``slot`` (starting at host
        ``address`` inside it) to ``fd`` at ``file_offset``; return the bytes written."""
        sq, cq = self._params.sq_off, self._params.cq_off
        tail = _U32.unpack_from(self._sq_ring, sq.tail)[0]
        index = tail & self._sq_mask
        self._user_data += 1
        _SQE.pack_into(
            self._sqes, index * _SQE.size,
            _IORING_OP_WRITE_FIXED, 0, 0, fd, file_offset, address, length, 0,
            self._user_data, slot, 0, 0, 0, 0,
        )  # fmt: skip
        _U32.pack_into(self._sq_ring, sq.array + index * 4, index)
        _U32.pack_into(self._sq_ring, sq.tail, (tail + 1) & 0xFFFFFFFF)
        to_submit = 1
        while True:
            ret = _syscall(
                ctypes.c_long(_NR_IO_URING_ENTER),
                ctypes.c_long(self.fd),
                ctypes.c_long(to_submit),
                ctypes.c_long(1),
                ctypes.c_long(_IORING_ENTER_GETEVENTS),
                ctypes.c_void_p(0),
                ctypes.c_long(0),
            )
            if ret < 0 and ctypes.get_errno() == errno.EINTR:
                to_submit = 0 if _U32.unpack_from(self._sq_ring, sq.head)[0] != tail else 1
                continue
            _check(ret, "io_uring_enter(WRITE_FIXED)")
            head = _U32.unpack_from(self._cq_ring, cq.head)[0]
            if head != _U32.unpack_from(self._cq_ring, cq.tail)[0]:
                break
            to_submit = 0
        user_data: int
        res: int
        user_data, res, _flags = _CQE.unpack_from(self._cq_ring, cq.cqes + (head & self._cq_mask) * _CQE.size)
        _U32.pack_into(self._cq_ring, cq.head, (head + 1) & 0xFFFFFFFF)
        if user_data != self._user_data:
            raise HostMemoryError(errno.EIO, f"io_uring: unexpected completion {user_data}")
        if res < 0:
            raise HostMemoryError(
                -res,
                f"WRITE_FIXED(slot={slot}, [{address:#x}, +{length:#x})) failed: {os.strerror(-res)}",
            )
        return res

    def close(self) -> None:
        """Unmap the rings and close the ring fd (the kernel then drops any buffers)."""
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RawRing:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@lru_cache(maxsize=1)
def available() -> tuple[bool, str]:
    """Whether io_uring sparse fixed buffers work here; the reason when they do not."""
    if platform.machine() != "x86_64":
        machine = platform.machine()
        return False, f"io_uring backend uses x86_64 syscall numbers; machine is {machine}"
    try:
        with RawRing(1) as ring:
            ring.register_sparse(1)
    except HostMemoryError as e:
        if e.errno == errno.ENOSYS:
            return False, "io_uring_setup: ENOSYS (kernel built without io_uring)"
        if e.errno == errno.EPERM:
            try:
                with open("/proc/sys/kernel/io_uring_disabled") as f:
                    setting = f.read().strip()
            except OSError:
                setting = "?"
            return False, f"io_uring_setup: EPERM (kernel.io_uring_disabled={setting})"
        if e.errno == errno.EINVAL:
            return False, f"sparse buffer tables unsupported (kernel < 5.19?): {e}"
        return False, str(e)
    return True, "io_uring sparse fixed buffers available"


class _Ring:
    """One ring and which of its slots are in use (one byte per slot, 1 = used)."""

    __slots__ = ("raw", "state", "used")

    def __init__(self, raw: RawRing) -> None:
        self.raw = raw
        self.state = bytearray(raw.slots)
        self.used = 0

    def take(self, n: int) -> list[tuple[int, int]]:
        """Mark up to ``n`` free slots used, lowest first, and return them as runs of
        consecutive slots ``(first, count)``, ascending; fewer than ``n`` when the ring
        fills up."""
        state = self.state
        runs: list[tuple[int, int]] = []
        pos = 0
        while n:
            first = state.find(0, pos)
            if first < 0:
                break
            end = state.find(1, first)
            if end < 0:
                end = len(state)
            count = min(n, end - first)
            state[first : first + count] = b"\1" * count
            runs.append((first, count))
            n -= count
            self.used += count
            pos = first + count
        return runs

    def give_back(self, first: int, count: int = 1) -> None:
        self.state[first : first + count] = bytes(count)
        self.used -= count


class Buffer(NamedTuple):
    """One registered fixed buffer of a pin: which ring and slot, and what it covers."""

    ring: int
    slot: int
    address: int
    size: int


# Buffer(...) without the Python-level namedtuple __new__ (a hot path).
_tuple_new = tuple.__new__
_size_of = itemgetter(1)
_PIN = faults.Op.PIN
_UNPIN = faults.Op.UNPIN
_Run = tuple[int, int, int]
"""Consecutive slots of one ring: (ring index, first slot, count)."""


class IoUringDmaBackend(DmaBackend):
    """Real DMA-style pins through io_uring fixed buffers (see module docstring).

    ``buffer_bytes`` defaults to the kernel limit, ``slots_per_ring`` to
    :data:`DEFAULT_SLOTS_PER_RING`; other values exist for tests and experiments.
    """

    def __init__(
        self,
        buffer_bytes: int = MAX_BUFFER_BYTES,
        slots_per_ring: int = DEFAULT_SLOTS_PER_RING,
    ) -> None:
        if not (0 < buffer_bytes <= MAX_BUFFER_BYTES and buffer_bytes % PAGE_SIZE == 0):
            raise InvalidArgument(
                f"buffer_bytes must be a multiple of {PAGE_SIZE} in (0, {MAX_BUFFER_BYTES}]"
            )
        if not 0 < slots_per_ring <= MAX_BUFFERS_PER_RING:
            raise InvalidArgument(f"slots_per_ring must be in [1, {MAX_BUFFERS_PER_RING}]")
        super().__init__()
        self._buffer_bytes = buffer_bytes
        self._slots_per_ring = slots_per_ring
        self._rings: list[_Ring] = []
        self._buffers: dict[int, list[Buffer]] = {}
        self._sink = -1
        self._add_ring()

    @property
    def ring_count(self) -> int:
        return len(self._rings)

    @property
    def slots_per_ring(self) -> int:
        return self._slots_per_ring

    def buffers(self, handle: PinHandle) -> list[Buffer]:
        """The fixed buffers currently registered for ``handle``."""
        with self._lock:
            self._check_open()
            self._check_handle(handle)
            return list(self._buffers[handle.token])

    def _add_ring(self) -> _Ring:
        faults.checkpoint(faults.Op.MMAP)  # io_uring_setup + ring mmaps + table registration
        raw = RawRing()
        try:
            raw.register_sparse(self._slots_per_ring)
        except BaseException:
            raw.close()
            raise
        ring = _Ring(raw)
        self._rings.append(ring)
        return ring

    # -- slots ------------------------------------------------------------------------

    def _take_slots(self, n: int) -> list[_Run]:
        """Mark ``n`` slots used: the lowest free ones of the lowest rings that have any,
        in new rings once all are full. Returns the runs in slot order."""
        runs: list[_Run] = []
        index = 0
        try:
            while n:
                if index == len(self._rings):
                    self._add_ring()
                for first, count in self._rings[index].take(n):
                    runs.append((index, first, count))
                    n -= count
                index += 1
        except BaseException:
            self._give_back(runs)
            raise
        return runs

    def _give_back(self, runs: list[_Run]) -> None:
        rings = self._rings
        for index, first, count in runs:
            rings[index].give_back(first, count)

    def _register(self, ranges: Sequence[tuple[int, int]]) -> list[_Run]:
        """Register each of ``ranges`` (one buffer each) in a fresh slot, all or nothing.

        One ``Op.PIN`` checkpoint per range comes first, before anything is taken or
        registered; then one ``BUFFERS_UPDATE`` per run of consecutive slots. Returns the
        runs, in the order of ``ranges``. On failure nothing stays registered or taken
        (the rollback is no fault point) and the error propagates.
        """
        if faults.active():
            checkpoint = faults.checkpoint
            for _ in ranges:
                checkpoint(_PIN)
        runs = self._take_slots(len(ranges))
        rings = self._rings
        done: list[_Run] = []
        try:
            pos = 0
            for index, first, count in runs:
                raw = rings[index].raw
                off = 0
                while off < count:
                    # A partial update reports only its count; resubmitting the rest
                    # either goes on or raises the failing buffer's own error.
                    got = raw.update_many(first + off, ranges[pos + off : pos + count])
                    done.append((index, first + off, got))
                    off += got
                pos += count
        except BaseException:
            try:
                for index, first, count in done:
                    rings[index].raw.release_many(first, count)
            finally:
                self._give_back(runs)
            raise
        return runs

    # -- DmaBackend hooks -----------------------------------------------------------------

    def _pin_impl(self, handle: PinHandle) -> None:
        bb = self._buffer_bytes
        end = handle.end
        pieces = [(address, min(bb, end - address)) for address in range(handle.host_address, end, bb)]
        runs = self._register(pieces)
        bufs: list[Buffer] = []
        it = iter(pieces)
        for index, first, count in runs:
            for slot in range(first, first + count):
                address, size = next(it)
                bufs.append(_tuple_new(Buffer, (index, slot, address, size)))
        self._buffers[handle.token] = bufs

    def _pin_many_impl(self, ranges: Sequence[tuple[int, int]]) -> list[PinHandle]:
        # Hot path of a container mapping an RDM populate granule by granule: one buffer
        # per range, consecutive slots registered with one BUFFERS_UPDATE, and per range
        # only a handle and its bookkeeping. Ranges above the buffer size take the
        # general path.
        if max(map(_size_of, ranges)) > self._buffer_bytes:
            return super()._pin_many_impl(ranges)
        runs = self._register(ranges)
        handles: list[PinHandle] = []
        append = handles.append
        owned = self._buffers
        live = self._handles
        total = 0
        it = iter(ranges)
        for index, first, count in runs:
            for slot in range(first, first + count):
                address, size = next(it)
                handle = new_handle(address, size)
                token = handle.token
                owned[token] = [_tuple_new(Buffer, (index, slot, address, size))]
                live[token] = handle
                total += size
                append(handle)
        self._pinned_bytes += total
        return handles

    def _unpin_many_impl(self, handles: Sequence[PinHandle]) -> None:
        # Single-buffer handles are released in batches, one BUFFERS_UPDATE per run of
        # consecutive slots; a handle with several buffers (or a partly released one)
        # takes the general path in its place in the order.
        owned = self._buffers
        batch: list[PinHandle] = []
        for handle in handles:
            if len(owned[handle.token]) == 1:
                batch.append(handle)
                continue
            self._unpin_batch(batch)
            batch = []
            super()._unpin_many_impl((handle,))
        self._unpin_batch(batch)

    def _unpin_batch(self, handles: list[PinHandle]) -> None:
        """Release single-buffer ``handles`` in order: one ``Op.UNPIN`` checkpoint each,
        all before the syscalls; a fault at the i-th releases the ones before it."""
        if not handles:
            return
        if faults.active():
            checkpoint = faults.checkpoint
            for i in range(len(handles)):
                try:
                    checkpoint(_UNPIN)
                except BaseException:
                    self._release_singles(handles[:i])
                    raise
        self._release_singles(handles)

    def _release_singles(self, handles: list[PinHandle]) -> None:
        """Unregister single-buffer ``handles`` (checkpoints passed), one ``release_many``
        per run of consecutive slots, and forget them. On a failure the handles before
        the failing slot are released and forgotten, the rest stay live, and the error
        propagates."""
        owned = self._buffers
        live = self._handles
        remaining = self._remaining
        rings = self._rings
        slots = [owned[handle.token][0] for handle in handles]
        n = len(slots)
        i = 0
        while i < n:
            index, first = slots[i][0], slots[i][1]
            j = i + 1
            while j < n and slots[j][0] == index and slots[j][1] == first + j - i:
                j += 1
            ring = rings[index]
            got = ring.raw.release_many(first, j - i)
            ring.give_back(first, got)
            released = 0
            for handle in handles[i : i + got]:
                token = handle.token
                del owned[token]
                del live[token]
                released += remaining.pop(token, handle.size)
            self._pinned_bytes -= released
            i += got

    def _release(self, buf: Buffer) -> None:
        ring = self._rings[buf.ring]
        ring.raw.update(buf.slot, 0, 0)
        ring.give_back(buf.slot)

    def _unpin_impl(self, handle: PinHandle) -> None:
        remaining = self._buffers[handle.token]
        while remaining:
            faults.checkpoint(_UNPIN)
            buf = remaining[0]
            self._release(buf)
            remaining.pop(0)
            self._note_released(handle, buf.size)
        del self._buffers[handle.token]

    def _dma_read_impl(self, handle: PinHandle, offset: int, length: int) -> bytes:
        if self._sink < 0:
            self._sink = os.memfd_create("ramdiscard-dma-sink", os.MFD_CLOEXEC)
        start = handle.host_address + offset
        end = start + length
        try:
            for buf in self._buffers[handle.token]:
                pos = max(start, buf.address)
                stop = min(end, buf.address + buf.size)
                while pos < stop:
                    n = self._rings[buf.ring].raw.write_fixed(
                        buf.slot, pos, min(stop - pos, _MAX_IO), self._sink, pos - start
                    )
                    if n <= 0:
                        raise HostMemoryError(errno.EIO, f"WRITE_FIXED wrote {n} bytes")
                    pos += n
            data = os.pread(self._sink, length, 0)
        finally:
            os.ftruncate(self._sink, 0)
        if len(data) != length:
            raise HostMemoryError(errno.EIO, f"dma_read got {len(data)} of {length} bytes")
        return data

    def _close_impl(self) -> None:
        try:
            for bufs in self._buffers.values():
                for buf in bufs:
                    # Closing the ring below drops the buffer anyway.
                    with contextlib.suppress(HostMemoryError):
                        self._release(buf)
        finally:
            self._buffers.clear()
            for ring in self._rings:
                ring.raw.close()
            self._rings.clear()
            if self._sink >= 0:
                os.close(self._sink)
                self._sink = -1
