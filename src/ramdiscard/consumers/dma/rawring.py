"""io_uring driven by raw syscalls: the thin layer under the DMA backend, no bookkeeping.

Rules:

* :class:`RawRing` is one io_uring instance (``io_uring_setup`` plus its mmapped SQ/CQ
  rings). ``register_sparse(n)`` registers an empty n-slot fixed-buffer table
  (``IORING_REGISTER_BUFFERS2`` + ``IORING_RSRC_REGISTER_SPARSE``); ``update`` /
  ``update_many`` register (pin) ranges in slots and, with an empty iovec, unregister
  (unpin) them (``IORING_REGISTER_BUFFERS_UPDATE``); ``write_fixed`` runs one
  ``IORING_OP_WRITE_FIXED`` to completion.
* Every kernel failure raises :class:`~ramdiscard.errors.HostMemoryError` with the errno
  and the call. A multi-slot update the kernel stopped part way reports how many slots it
  did (see :meth:`RawRing.update_many`); nothing is rolled back here.
* No fault checkpoints and no slot accounting: this is the layer the benchmarks use as
  the raw baseline, and :mod:`ramdiscard.consumers.dma.iouring` builds the
  :class:`~ramdiscard.consumers.dma.DmaBackend` contract on top.
* Only x86-64 syscall numbers are used. The ring memory is shared with the kernel and
  written with plain stores: on x86-64 stores are not reordered with other stores, and
  the ``io_uring_enter`` syscall orders them before the kernel reads the tail.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import struct
from array import array
from collections.abc import Sequence
from itertools import chain
from types import TracebackType

from ramdiscard.errors import HostMemoryError

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
_IORING_RSRC_REGISTER_SPARSE = 1 << 0
_IORING_OP_WRITE_FIXED = 5
_SQE = struct.Struct("<BBHiQQIIQHHiQQ")  # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")  # struct io_uring_cqe: user_data, res, flags
_U32 = struct.Struct("<I")
_UPDATE = struct.Struct("<IIQQII")  # struct io_uring_rsrc_update2
MAX_IO = 1 << 30
"""Most bytes one WRITE_FIXED moves (the kernel caps a read/write at 2 GiB - 4 KiB)."""

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
        # The multi-slot update record, written with one pack_into per call, and a
        # read-only table of empty iovecs (sized at register_sparse) for releases.
        self._upd_many = ctypes.create_string_buffer(_UPDATE_SIZE)
        self._upd_many_addr = ctypes.addressof(self._upd_many)
        self._empty = ctypes.create_string_buffer(0)
        self._empty_addr = ctypes.addressof(self._empty)
        self._empty_count = 0

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
        self._empty = ctypes.create_string_buffer(16 * nr)
        self._empty_addr = ctypes.addressof(self._empty)
        self._empty_count = nr

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
        return self._submit_many(first_slot, len(ranges), iov.buffer_info()[0])

    def release_many(self, first_slot: int, count: int) -> int:
        """Empty (unpin) ``count`` slots from ``first_slot`` with one ``BUFFERS_UPDATE``;
        same result contract as :meth:`update_many`."""
        if 0 < count <= self._empty_count:
            # _submit_many() inline: the unpin hot path.
            _UPDATE.pack_into(self._upd_many, 0, first_slot, 0, self._empty_addr, 0, count, 0)
            ret: int = _register(_NR_IO_URING_REGISTER, self.fd, _IORING_REGISTER_BUFFERS_UPDATE,
                                 self._upd_many_addr, _UPDATE_SIZE)  # fmt: skip
            if ret < 0:
                _check(ret, f"io_uring_register(BUFFERS_UPDATE, slots [{first_slot}, +{count}))")
            return ret
        empty = array("Q", bytes(16 * count))
        return self._submit_many(first_slot, count, empty.buffer_info()[0])

    def update_flat(self, first_slot: int, flat: array[int], start: int, count: int) -> int:
        """Register ``count`` ranges held as (address, size) pairs in ``flat`` (typecode
        ``Q``) from pair ``start`` on, in slots from ``first_slot``: :meth:`update_many`
        without building the iovec array. Raises ValueError (nothing done) unless
        ``0 <= start`` and ``0 < count`` and the pairs lie inside ``flat``."""
        if flat.typecode != "Q" or start < 0 or count <= 0 or 2 * (start + count) > len(flat):
            raise ValueError(f"pairs [{start}, +{count}) outside an iovec array of {len(flat) // 2}")
        # _submit_many() inline: the pin hot path.
        address = flat.buffer_info()[0] + 16 * start
        _UPDATE.pack_into(self._upd_many, 0, first_slot, 0, address, 0, count, 0)
        ret: int = _register(_NR_IO_URING_REGISTER, self.fd, _IORING_REGISTER_BUFFERS_UPDATE,
                             self._upd_many_addr, _UPDATE_SIZE)  # fmt: skip
        if ret < 0:
            _check(ret, f"io_uring_register(BUFFERS_UPDATE, slots [{first_slot}, +{count}))")
        return ret

    def _submit_many(self, first_slot: int, count: int, iov_address: int) -> int:
        _UPDATE.pack_into(self._upd_many, 0, first_slot, 0, iov_address, 0, count, 0)
        ret: int = _register(_NR_IO_URING_REGISTER, self.fd, _IORING_REGISTER_BUFFERS_UPDATE,
                             self._upd_many_addr, _UPDATE_SIZE)  # fmt: skip
        if ret < 0:
            _check(ret, f"io_uring_register(BUFFERS_UPDATE, slots [{first_slot}, +{count}))")
        return ret

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
