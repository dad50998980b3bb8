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

Theory of operation: :class:`~ramdiscard.consumers.dma.rawring.RawRing`
(:mod:`ramdiscard.consumers.dma.rawring`) is the thin syscall layer, which keeps no
bookkeeping and is also the benchmarks' "raw baseline". :class:`IoUringDmaBackend` adds
slot allocation, splitting, rollback, fault checkpoints and the :class:`DmaBackend`
contract on top.
"""

from __future__ import annotations

import contextlib
import errno
import os
from array import array
from collections.abc import Sequence
from itertools import chain, repeat
from operator import itemgetter

from ramdiscard import faults
from ramdiscard.consumers.dma.backend import PAGE_SIZE, DmaBackend, PinHandle, next_token
from ramdiscard.consumers.dma.ioslots import Buffer, SlotRing, slot_of
from ramdiscard.consumers.dma.ioslots import available as available
from ramdiscard.consumers.dma.rawring import MAX_IO, RawRing
from ramdiscard.consumers.dma.runs import HANDLE, OWN, RELEASED, PinRun
from ramdiscard.errors import HostMemoryError, InvalidArgument

MAX_BUFFER_BYTES = 1 << 30
"""Largest single fixed buffer the kernel accepts (1 GiB + 4 KiB fails with EFAULT)."""
MAX_BUFFERS_PER_RING = 16384
"""Largest buffer table of one ring (16385 fails with EINVAL)."""
DEFAULT_SLOTS_PER_RING = 512
"""Buffer-table size of the backend's rings (see the module docstring for why)."""


# Buffer(...) without the Python-level namedtuple __new__ (a hot path).
_tuple_new = tuple.__new__
_new = object.__new__
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
        self._rings: list[SlotRing] = []
        self._buffers: dict[int, list[Buffer]] = {}
        self._sink = -1
        # Run pins with pieces still held in their own form (OWN), by id.
        self._runs: dict[int, PinRun] = {}
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

    def _add_ring(self) -> SlotRing:
        faults.checkpoint(faults.Op.MMAP)  # io_uring_setup + ring mmaps + table registration
        raw = RawRing()
        try:
            raw.register_sparse(self._slots_per_ring)
        except BaseException:
            raw.close()
            raise
        ring = SlotRing(raw)
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

    def _register(self, flat: array[int]) -> list[_Run]:
        """Register each (address, size) pair of ``flat`` (one buffer each) in a fresh
        slot, all or nothing.

        One ``Op.PIN`` checkpoint per range comes first, before anything is taken or
        registered; then one ``BUFFERS_UPDATE`` per run of consecutive slots, straight
        from ``flat``. Returns the runs, in the order of the ranges. On failure nothing
        stays registered or taken (the rollback is no fault point) and the error
        propagates.
        """
        n = len(flat) >> 1
        if faults.active():
            checkpoint = faults.checkpoint
            for _ in range(n):
                checkpoint(_PIN)
        rings = self._rings
        # _take_slots() inline when the lowest free slot of the first ring starts a free
        # stretch of n (the usual case); the same slots it would take.
        state = rings[0].state
        first = state.find(0)
        if first >= 0 and first + n <= len(state) and state.find(1, first, first + n) < 0:
            state[first : first + n] = b"\1" * n
            rings[0].used += n
            runs = [(0, first, n)]
        else:
            runs = self._take_slots(n)
        done: list[_Run] = []
        try:
            pos = 0
            for index, first, count in runs:
                raw = rings[index].raw
                off = 0
                while off < count:
                    # A partial update reports only its count; resubmitting the rest
                    # either goes on or raises the failing buffer's own error.
                    got = raw.update_flat(first + off, flat, pos + off, count - off)
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
        runs = self._register(array("Q", chain.from_iterable(pieces)))
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
        runs = self._register(array("Q", chain.from_iterable(ranges)))
        handles: list[PinHandle] = []
        append = handles.append
        owned = self._buffers
        live = self._handles
        new = _new
        slots = (
            zip(repeat(runs[0][0]), range(runs[0][1], runs[0][1] + runs[0][2]))
            if len(runs) == 1
            else [(index, slot) for index, first, count in runs for slot in range(first, first + count)]
        )
        for (address, size), (index, slot) in zip(ranges, slots, strict=True):
            token = next_token()
            handle = new(PinHandle)
            handle.__dict__.update(host_address=address, size=size, token=token)
            owned[token] = [_tuple_new(Buffer, (index, slot, address, size))]
            live[token] = handle
            append(handle)
        self._pinned_bytes += sum(map(_size_of, ranges))
        return handles

    def _unpin_many_impl(self, handles: Sequence[PinHandle]) -> None:
        # Single-buffer handles are released in batches, one BUFFERS_UPDATE per run of
        # consecutive slots; a handle with several buffers (or a partly released one)
        # takes the general path in its place in the order.
        owned = self._buffers
        bufs = [owned[handle.token] for handle in handles]
        if max(map(len, bufs)) == 1:
            self._unpin_batch(list(handles), [b[0] for b in bufs])
            return
        batch: list[PinHandle] = []
        for handle, held in zip(handles, bufs, strict=True):
            if len(held) == 1:
                batch.append(handle)
                continue
            self._unpin_batch(batch, [owned[h.token][0] for h in batch])
            batch = []
            super()._unpin_many_impl((handle,))
        self._unpin_batch(batch, [owned[h.token][0] for h in batch])

    def _unpin_batch(self, handles: list[PinHandle], slots: list[Buffer]) -> None:
        """Release single-buffer ``handles`` (``slots``: their buffers) in order: one
        ``Op.UNPIN`` checkpoint each, all before the syscalls; a fault at the i-th releases
        the ones before it."""
        if not handles:
            return
        if faults.active():
            checkpoint = faults.checkpoint
            for i in range(len(handles)):
                try:
                    checkpoint(_UNPIN)
                except BaseException:
                    self._release_singles(handles[:i], slots[:i])
                    raise
        self._release_singles(handles, slots)

    def _release_singles(self, handles: list[PinHandle], slots: list[Buffer]) -> None:
        """Unregister single-buffer ``handles`` (checkpoints passed; ``slots``: their
        buffers), one ``release_many`` per run of consecutive slots, and forget them. On a
        failure the handles before the failing slot are released and forgotten, the rest
        stay live, and the error propagates."""
        n = len(slots)
        if not n:
            return
        i = 0
        index, first = slots[0][0], slots[0][1]
        # The common case (a populate pinned in one run, discarded whole) is recognised
        # with two comprehensions instead of the per-slot loop below.
        if (
            slots[-1][1] - first == n - 1
            and [b[1] for b in slots] == list(range(first, first + n))
            and [b[0] for b in slots].count(index) == n
        ):
            i = self._release_run(handles, index, first, n)
        while i < n:
            index, first = slots[i][0], slots[i][1]
            j = i + 1
            while j < n and slots[j][0] == index and slots[j][1] == first + j - i:
                j += 1
            i += self._release_run(handles[i:j] if i or j < n else handles, index, first, j - i)

    def _release_run(self, handles: list[PinHandle], index: int, first: int, count: int) -> int:
        """Empty ``count`` consecutive slots of ring ``index`` from ``first`` (the buffers of
        ``handles``, in order) with one ``release_many`` and forget the handles released;
        returns how many were."""
        ring = self._rings[index]
        got = ring.raw.release_many(first, count)
        ring.give_back(first, got)
        done = handles if got == len(handles) else handles[:got]
        owned = self._buffers
        live = self._handles
        remaining = self._remaining
        released = 0
        if remaining:
            for handle in done:
                released += remaining.pop(handle.token, handle.size)
        else:
            released = sum([handle.size for handle in done])
        for token in [handle.token for handle in done]:
            del owned[token]
            del live[token]
        self._pinned_bytes -= released
        return got

    # -- run pins: one record per run of slots ------------------------------------------

    def _pin_run_impl(self, ranges: Sequence[tuple[int, int]]) -> PinRun:
        # One buffer per piece (the common case): a run keeps its slot runs and nothing
        # per piece; larger pieces take the handle form.
        flat = array("Q", chain.from_iterable(ranges))
        sizes = flat[1::2]
        if max(sizes) > self._buffer_bytes:
            return super()._pin_run_impl(ranges)
        slots = self._register(flat)
        run = PinRun(self, ranges, OWN)
        # The slot runs, and the pieces' sizes for the byte count at release.
        run.private = (slots, sizes)
        self._run_pieces += len(sizes)
        self._pinned_bytes += sum(sizes)
        self._runs[id(run)] = run
        return run

    def _unpin_run_impl(self, run: PinRun, lo: int, hi: int) -> None:
        state = run.state
        if faults.active() or state.find(HANDLE, lo, hi) >= 0:
            # Per-piece checkpoints and handles: the general path, piece by piece.
            for i in range(lo, hi):
                if state[i] == OWN:
                    self._materialize(run, i)
            super()._unpin_run_impl(run, lo, hi)
            return
        rings = self._rings
        slots, sizes = run.private
        pos = 0
        try:
            for index, first, count in slots:
                a, b = max(lo, pos), min(hi, pos + count)
                while a < b:
                    a = state.find(OWN, a, b)
                    if a < 0:
                        break
                    e = state.find(RELEASED, a, b)
                    e = b if e < 0 else e
                    ring = rings[index]
                    # Raises if the first slot fails; a partial update reports its count.
                    got = ring.raw.release_many(first + a - pos, e - a)
                    free = bytes(got)  # ring.give_back() inline, and the pieces' state
                    ring.state[first + a - pos : first + a - pos + got] = free
                    ring.used -= got
                    state[a : a + got] = free
                    self._run_pieces -= got
                    self._pinned_bytes -= sum(sizes[a : a + got])
                    a += got
                pos += count
                if pos >= hi:
                    break
        finally:
            if OWN not in state:
                self._runs.pop(id(run), None)

    def _run_handle_impl(self, run: PinRun, i: int) -> PinHandle:
        if run.state[i] == OWN:
            return self._materialize(run, i)
        return super()._run_handle_impl(run, i)

    def run_holds(self, run: PinRun, i: int) -> bool:
        return not self._closed and super().run_holds(run, i)

    def _materialize(self, run: PinRun, i: int) -> PinHandle:
        """Make piece ``i`` (held by the run) the pin of a handle of its own."""
        ring, slot = slot_of(run.private[0], i)
        address, size = run.ranges[i]
        handle = PinHandle(address, size, next_token())
        self._buffers[handle.token] = [Buffer(ring, slot, address, size)]
        self._handles[handle.token] = handle
        if run.handles is None:
            run.handles = [None] * len(run)
        run.handles[i] = handle
        run.state[i] = HANDLE
        self._run_pieces -= 1
        if OWN not in run.state:
            self._runs.pop(id(run), None)
        return handle

    def _materialize_runs(self) -> None:
        for run in list(self._runs.values()):
            for i, st in enumerate(run.state):
                if st == OWN:
                    self._materialize(run, i)

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
                        buf.slot, pos, min(stop - pos, MAX_IO), self._sink, pos - start
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
            for run in list(self._runs.values()):
                # Released now so VmPin drops at close, not when the kernel frees the ring.
                with contextlib.suppress(HostMemoryError):
                    self._unpin_run_impl(run, 0, len(run))
        finally:
            self._buffers.clear()
            self._runs.clear()
            for ring in self._rings:
                ring.raw.close()
            self._rings.clear()
            if self._sink >= 0:
                os.close(self._sink)
                self._sink = -1
