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
* Every slot fill passes ``faults.checkpoint(Op.PIN)`` and every slot release
  ``faults.checkpoint(Op.UNPIN)``, before the syscall; creating a ring (also in the
  middle of a pin, when every ring is full) passes ``faults.checkpoint(Op.MMAP)``. A
  failed pin releases the slots it filled (the rollback is no fault point). A failed
  unpin keeps the handle with the slots still registered; a retry releases the rest.
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
import heapq
import mmap
import os
import platform
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from types import TracebackType

from ramdiscard import faults
from ramdiscard.dma.backend import PAGE_SIZE, DmaBackend, PinHandle, new_handle
from ramdiscard.errors import HostMemoryError, InvalidArgument

MAX_BUFFER_BYTES = 1 << 30
"""Largest single fixed buffer the kernel accepts (1 GiB + 4 KiB fails with EFAULT)."""
MAX_BUFFERS_PER_RING = 16384
"""Largest buffer table of one ring (16385 fails with EINVAL)."""

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


@dataclass
class _Ring:
    raw: RawRing
    free: list[int] = field(default_factory=list)  # heap of freed slots
    next_unused: int = 0
    used: int = 0

    def has_free(self) -> bool:
        return bool(self.free) or self.next_unused < self.raw.slots

    def take(self) -> int:
        self.used += 1
        if self.free:
            return heapq.heappop(self.free)
        self.next_unused += 1
        return self.next_unused - 1

    def give_back(self, slot: int) -> None:
        self.used -= 1
        heapq.heappush(self.free, slot)


@dataclass(frozen=True, slots=True)
class Buffer:
    """One registered fixed buffer of a pin: which ring and slot, and what it covers."""

    ring: int
    slot: int
    address: int
    size: int


_new = object.__new__
_set = object.__setattr__


def _new_buffer(ring: int, slot: int, address: int, size: int) -> Buffer:
    # Same as Buffer(...) without the frozen-dataclass __init__ (a hot path).
    buf = _new(Buffer)
    _set(buf, "ring", ring)
    _set(buf, "slot", slot)
    _set(buf, "address", address)
    _set(buf, "size", size)
    return buf


class IoUringDmaBackend(DmaBackend):
    """Real DMA-style pins through io_uring fixed buffers (see module docstring).

    ``buffer_bytes`` and ``slots_per_ring`` default to the kernel limits; smaller values
    exist for tests and experiments.
    """

    def __init__(
        self,
        buffer_bytes: int = MAX_BUFFER_BYTES,
        slots_per_ring: int = MAX_BUFFERS_PER_RING,
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

    def _take_slot(self) -> tuple[int, int]:
        first = self._rings[0]
        if first.free or first.next_unused < first.raw.slots:
            return 0, first.take()
        for i, ring in enumerate(self._rings):
            if ring.has_free():
                return i, ring.take()
        self._add_ring()
        return len(self._rings) - 1, self._rings[-1].take()

    def _pin_impl(self, handle: PinHandle) -> None:
        done: list[Buffer] = []
        try:
            for address in range(handle.host_address, handle.end, self._buffer_bytes):
                size = min(self._buffer_bytes, handle.end - address)
                faults.checkpoint(faults.Op.PIN)
                ring, slot = self._take_slot()
                try:
                    self._rings[ring].raw.update(slot, address, size)
                except BaseException:
                    self._rings[ring].give_back(slot)
                    raise
                done.append(Buffer(ring, slot, address, size))
        except BaseException:
            for buf in reversed(done):
                self._release(buf)
            raise
        self._buffers[handle.token] = done

    def _pin_many_impl(self, ranges: Sequence[tuple[int, int]]) -> list[PinHandle]:
        # Hot path of a container mapping an RDM populate granule by granule: one buffer
        # per range, one checkpoint and one BUFFERS_UPDATE each, no per-range validation
        # or lock round trip. Ranges above the buffer size take the general path.
        bb = self._buffer_bytes
        if any(size > bb for _, size in ranges):
            return super()._pin_many_impl(ranges)
        checkpoint = faults.checkpoint
        op = faults.Op.PIN
        rings = self._rings
        done: list[tuple[int, int, int, int]] = []
        append = done.append
        heappop = heapq.heappop
        try:
            for address, size in ranges:
                checkpoint(op)
                ring = rings[0]
                free = ring.free
                if free:
                    index, slot = 0, heappop(free)
                    ring.used += 1
                elif ring.next_unused < ring.raw.slots:
                    index, slot = 0, ring.next_unused
                    ring.next_unused = slot + 1
                    ring.used += 1
                else:
                    index, slot = self._take_slot()
                    ring = rings[index]
                try:
                    ring.raw.update(slot, address, size)
                except BaseException:
                    ring.give_back(slot)
                    raise
                append((index, slot, address, size))
        except BaseException:
            for index, slot, address, size in reversed(done):
                self._release(Buffer(index, slot, address, size))
            raise
        handles: list[PinHandle] = []
        owned = self._buffers
        live = self._handles
        remaining = self._remaining
        total = 0
        for index, slot, address, size in done:
            handle = new_handle(address, size)
            token = handle.token
            owned[token] = [_new_buffer(index, slot, address, size)]
            live[token] = handle
            remaining[token] = size
            total += size
            handles.append(handle)
        self._pinned_bytes += total
        return handles

    def _unpin_many_impl(self, handles: Sequence[PinHandle]) -> None:
        checkpoint = faults.checkpoint
        op = faults.Op.UNPIN
        owned = self._buffers
        rings = self._rings
        for handle in handles:
            bufs = owned[handle.token]
            if len(bufs) != 1:
                super()._unpin_many_impl([handle])
                continue
            checkpoint(op)
            buf = bufs[0]
            ring = rings[buf.ring]
            ring.raw.update(buf.slot, 0, 0)
            ring.give_back(buf.slot)
            del owned[handle.token]
            self._forget(handle)

    def _release(self, buf: Buffer) -> None:
        self._rings[buf.ring].raw.update(buf.slot, 0, 0)
        self._rings[buf.ring].give_back(buf.slot)

    def _unpin_impl(self, handle: PinHandle) -> None:
        remaining = self._buffers[handle.token]
        while remaining:
            faults.checkpoint(faults.Op.UNPIN)
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
