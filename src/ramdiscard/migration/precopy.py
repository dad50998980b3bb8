"""Live migration, precopy: the guest keeps running while its memory is sent.

Rules (qemu-ram-discard §3.10, live-migration.md; format in ``docs/migration-format.md``):

* The devices are frozen (plug/unplug answer BUSY, as QEMU's ``virtio_mem_is_busy``)
  from setup to the end, also on failure. The guest itself keeps writing until the
  switchover.
* Beyond QEMU, with :attr:`PrecopyParams.allow_resize` and a ``guard`` (the lock every
  plug and unplug holds, the machine lock): the devices are frozen only from the
  switchover. A RamDiscardListener on each device keeps the source's populated runs
  exact: a populated range joins them and is sent whole (and write-protected) in the
  next round, a discarded one leaves them (never scanned or read again). Every guest
  memory copy happens under ``guard``, clipped to the runs of that moment, so memory
  discarded concurrently is never read. A round that follows a change starts with the
  device's new state (DEVICE section): the destination discards what left the plugged
  set and accepts pages for what joined it.
* Dirty tracking per RAM region: a :class:`~ramdiscard.hostmem.uffd.WriteTracker`
  (userfaultfd WP_ASYNC) over the region; only the populated runs (the manager's
  ``replay_populated``, the whole region without a manager) are write-protected and
  scanned, so every round's dirty set is the scan ANDed with the populated state and
  discarded memory is never protected, scanned or read.
* Round 1 sends every populated run. Each later round scan-and-resets the populated runs
  and sends what was written since. After each scan the source estimates the downtime
  (dirty bytes / the bandwidth measured in the last round); when it fits
  ``downtime_limit`` (or ``max_rounds`` is reached, or a round did not shrink the
  remainder while the rounds already exceed 5) it switches over: the guest is paused, a
  last scan is merged in, the rest is sent with the final DEVICE states and END.
* Fallback without PAGEMAP_SCAN/WP_ASYNC (:func:`ramdiscard.hostmem.uffd.available`
  says why): nothing can tell which pages changed, so round 1 is followed at once by the
  switchover, which resends every populated run (downtime = a full copy).
  :attr:`PrecopyStats.fallback` carries the reason.
* Return path: a live destination acknowledges its read position (``AK`` + u64, at
  most every :data:`ACK_INTERVAL` s while data arrives) ahead of its final status.
  The source reads these between batches and while it throttles: when stream bytes
  are outstanding and the acknowledged position has not moved for ``io_timeout``
  seconds, the destination is stalled (it read nothing) and the migration fails, even
  while the kernel's socket buffers could still absorb data (a throttled source would
  otherwise notice only once both buffers are full).
* Cancel (``cancel`` set, normally together with ``sock.shutdown``) is honoured within
  one send call or :data:`CANCEL_POLL` s of a throttling pause, and always reported as
  "migration cancelled".
* On failure or cancel (``cancel`` set, the socket shut down, the destination refusing or
  stalling past the socket timeout) the guest is resumed, the trackers closed (memory
  unprotected) and the devices unfrozen: the source runs on as before. On success the
  guest stays paused (``postmigrate``); the caller decides.
* Receiving is :mod:`ramdiscard.migration.live_load`.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ramdiscard.hostmem import uffd
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.migration.busy import frozen
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.runs import Coverage, Runs, merge
from ramdiscard.migration.stream import (
    MAX_LIST_PAGES,
    Counter,
    MigrationError,
    StreamError,
    StreamFlags,
    encode_device,
    encode_end,
    encode_region,
    encode_round,
    encode_stream_header,
    page_header,
    page_list_header,
)
from ramdiscard.migration.transport import (
    IO_TIMEOUT,
    STATUS_TIMEOUT,
    PeerAnswered,
    recv_status,
)
from ramdiscard.rdm.listener import RamDiscardListener

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

PAGE = 4096
CHUNK = 1 << 20
"""Largest page section of a contiguous dirty run."""
LIST_RUN = 16 * PAGE
"""Dirty runs up to this long go out page by page in PAGE_LIST sections."""
BATCH_BYTES = 1 << 20
BATCH_IOV = 512
DEFAULT_DOWNTIME = 0.3
DEFAULT_MAX_ROUNDS = 30
ACK_INTERVAL = 0.05
"""Seconds between two read-position acknowledgements of a live destination."""
CANCEL_POLL = 0.05
"""Longest throttling sleep between two looks at ``cancel`` and the return path."""
RETURN_MSG = struct.Struct("<2sI")
"""Return-path message header: two-letter kind (``AK``), payload length."""
RETURN_POS = struct.Struct("<Q")
"""Payload of ``AK``: the destination's read position in the stream."""


class _ReturnPath:
    """The source's reader of the destination's messages (``AK`` position acks, then
    the ``OK``/``ER`` status), without blocking: :meth:`poll` takes what has arrived."""

    def __init__(self, sock: socket.socket, io_timeout: float | None) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._buf = bytearray()
        self.acked = 0
        self.acks = 0
        self.progress_at = time.monotonic()
        self.status: bytes | None = None
        """The raw status message (header and text) once one arrived."""
        self.eof = False

    def poll(self) -> None:
        while self.status is None and not self.eof and self._poll.poll(0):
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                    self.eof = True
                    return
                raise
            if not data:
                self.eof = True
                return
            self._buf += data
            self._parse()

    def _parse(self) -> None:
        while len(self._buf) >= RETURN_MSG.size and self.status is None:
            code, length = RETURN_MSG.unpack_from(self._buf)
            if code != b"AK":
                whole = RETURN_MSG.size + (length if length <= 4096 else 0)
                if len(self._buf) >= whole:
                    self.status = bytes(self._buf[:whole])
                return
            if length != RETURN_POS.size:
                raise StreamError(f"the destination sent a malformed acknowledgement (length {length})")
            if len(self._buf) < RETURN_MSG.size + length:
                return
            (pos,) = RETURN_POS.unpack_from(self._buf, RETURN_MSG.size)
            del self._buf[: RETURN_MSG.size + length]
            self.acks += 1
            if pos > self.acked:
                self.acked = pos
                self.progress_at = time.monotonic()

    def sent(self, before: int) -> None:
        """Stream bytes were sent; ``before`` is the stream position before them."""
        if before <= self.acked:
            self.progress_at = time.monotonic()  # nothing was outstanding: a silence starts now

    def check_stall(self, position: int) -> None:
        """Raise TimeoutError when bytes up to ``position`` are outstanding and the
        destination acknowledged nothing for ``io_timeout`` seconds."""
        if self.io_timeout is None or position <= self.acked:
            return
        if time.monotonic() - self.progress_at > self.io_timeout:
            raise TimeoutError("the destination stopped reading")

    def verdict(self, timeout: float | None) -> str | None:
        """Wait (``timeout`` s) for the status; None for success, else its message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status is None and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left is not None and left <= 0:
                raise MigrationError(f"the destination sent no status within {timeout:g} s")
            if self._poll.poll(None if left is None else int(left * 1000) + 1):
                self.poll()
        if self.status is None:
            raise MigrationError("the destination closed the connection without a status")
        return recv_status(_Replay(self.status))  # type: ignore[arg-type]


class _Replay:
    """Bytes already received, read back like a socket (for ``recv_status``)."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)

    def gettimeout(self) -> float:
        return 0.0

    def recv_into(self, view: memoryview, n: int) -> int:
        k = min(n, self.data.nbytes)
        view[:k] = self.data[:k]
        self.data = self.data[k:]
        return k


class GuestControl(Protocol):
    """Stops and restarts the guest's vCPUs (the writer)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class PrecopyParams:
    downtime_limit: float = DEFAULT_DOWNTIME
    """Seconds the guest may be stopped at the switchover (QEMU's downtime-limit)."""
    max_bandwidth: int = 0
    """Bytes per second on the wire during the live rounds (0: unlimited)."""
    max_rounds: int = DEFAULT_MAX_ROUNDS
    allow_resize: bool = False
    """Devices stay resizable during the live rounds (frozen only at the switchover);
    needs the ``guard`` under which plug and unplug happen (module rules)."""


@dataclass
class PrecopyStats:
    """Figures of one precopy (QEMU's query-migrate names where they exist)."""

    status: str = "setup"
    rounds: int = 0
    round_bytes: list[int] = field(default_factory=list)
    page_bytes: int = 0
    stream_bytes: int = 0
    total_bytes: int = 0
    """Populated bytes at setup (what round 1 sends)."""
    remaining: int = 0
    dirty_rate: float = 0.0
    """Bytes per second written by the guest, from the last round."""
    bandwidth: float = 0.0
    expected_downtime: float = 0.0
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float = 0.0
    fallback: str | None = None
    pages_sent: int = 0


ProgressFn = Callable[[PrecopyStats], None]




class _Batcher:
    """Sends page sections with few ``sendmsg`` calls: headers and guest-memory views
    go out as one iovec list (no copy in Python). Before every send and while it
    throttles it reads the return path (module rules: cancel, stall, early status)."""

    def __init__(
        self,
        sock: socket.socket,
        stats: PrecopyStats,
        params: PrecopyParams,
        cancel: threading.Event,
        ret: _ReturnPath,
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.params = params
        self.cancel = cancel
        self.ret = ret
        self.bufs: list[bytes | memoryview] = []
        self.bytes = 0
        self._t0 = time.perf_counter()
        self._sent = 0
        self.throttle = True
        self._bounce = bytearray(BATCH_BYTES + CHUNK)
        self._used = 0

    def copy(self, data: memoryview) -> memoryview:
        """A copy of ``data`` in this batch's bounce buffer (valid until the flush):
        memory the guest is writing is checksummed and sent as one consistent copy."""
        n = data.nbytes
        if self._used + n > len(self._bounce):
            self.flush()
        dst = memoryview(self._bounce)[self._used : self._used + n]
        dst[:] = data
        self._used += n
        return dst

    def gather(self, pages: np.ndarray, offsets: list[int]) -> memoryview:
        """Copies of the 4 KiB pages at ``offsets`` of ``pages`` (a region as rows of one
        page), in order, in this batch's bounce buffer: call :meth:`make_room` first."""
        n = len(offsets)
        dst = memoryview(self._bounce)[self._used : self._used + n * PAGE]
        idx = np.fromiter(offsets, dtype=np.int64, count=n) // PAGE
        np.take(pages, idx, axis=0, out=np.frombuffer(dst, dtype=np.uint8).reshape(n, PAGE), mode="clip")
        self._used += n * PAGE
        return dst

    def make_room(self, n: int) -> None:
        """Flush now unless ``n`` more bytes fit the bounce buffer."""
        if self._used + n > len(self._bounce):
            self.flush()

    def add(self, header: bytes, data: memoryview | None = None) -> None:
        self.bufs.append(header)
        self.bytes += len(header)
        if data is not None:
            self.bufs.append(data)
            self.bytes += data.nbytes
        if self.bytes >= BATCH_BYTES or len(self.bufs) >= BATCH_IOV:
            self.flush()

    def check(self) -> None:
        """Raise when cancelled, when the destination answered or hung up, or when it
        stalled (module rules)."""
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")
        self.ret.poll()
        if self.ret.status is not None or self.ret.eof:
            raise PeerAnswered("the destination answered before the end of the stream")
        self.ret.check_stall(self.stats.stream_bytes)

    def flush(self) -> None:
        if not self.bufs:
            return
        self.check()
        bufs, total = self.bufs, self.bytes
        self.bufs, self.bytes, self._used = [], 0, 0
        limit = self.sock.gettimeout()
        deadline = None if limit is None else time.monotonic() + limit
        while bufs:
            # The socket timeout bounds each call; a peer reading a trickle would reset it,
            # so the whole batch (about 1 MiB) gets one bound too.
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("send stalled")
            n = self.sock.sendmsg(bufs)
            while n:
                first = bufs[0]
                size = len(first) if isinstance(first, bytes) else first.nbytes
                if n >= size:
                    n -= size
                    bufs.pop(0)
                else:
                    bufs[0] = memoryview(first)[n:]
                    n = 0
        before = self.stats.stream_bytes
        self.stats.stream_bytes += total
        self.ret.sent(before)
        self._sent += total
        rate = self.params.max_bandwidth
        if rate and self.throttle:
            while (ahead := self._sent / rate - (time.perf_counter() - self._t0)) > 0:
                self.cancel.wait(min(ahead, CANCEL_POLL))
                self.check()


class _PlugWatcher(RamDiscardListener):
    """Follows a device's populated set for a resizable precopy (module rules)."""

    double_discard_supported = True

    def __init__(self) -> None:
        self.plugged = Coverage()
        self.fresh = Coverage()
        self.changed = False
        self.replaying = True

    def notify_populate(self, section: MemoryRegionSection) -> None:
        s = section.offset_within_region
        self.plugged.add(s, s + section.size)
        if not self.replaying:
            self.fresh.add(s, s + section.size)
            self.changed = True

    def notify_discard(self, section: MemoryRegionSection) -> None:
        s = section.offset_within_region
        self.plugged.remove(s, s + section.size)
        self.fresh.remove(s, s + section.size)
        self.changed = True


class _Region:
    def __init__(self, region: RamRegion, watch: bool = False) -> None:
        self.region = region
        self.view = region.view
        self.watcher: _PlugWatcher | None = None
        if watch and region.device is not None:
            self.watcher = _PlugWatcher()
            region.device.register_listener(self.watcher, MemoryRegionSection(region.mr, 0, region.mr.size))
            self.watcher.replaying = False
            self.runs: Runs = self.watcher.plugged.runs()
        else:
            self.runs = region.populated_runs()
        self.tracker: uffd.WriteTracker | None = None
        self._pages: np.ndarray | None = None

    @property
    def pages(self) -> np.ndarray:
        """The region's memory as rows of one 4 KiB page (no copy)."""
        if self._pages is None:
            self._pages = np.frombuffer(self.view, dtype=np.uint8).reshape(-1, PAGE)
        return self._pages

    def clip(self, start: int, end: int) -> Runs:
        """The parts of ``[start, end)`` populated now (call under the guard)."""
        if self.watcher is None:
            return [(start, end - start)]
        return self.watcher.plugged.clip(start, end)

    def take_fresh(self) -> Runs:
        """Ranges populated since the last call, now write-protected (under the guard)."""
        assert self.watcher is not None
        fresh = self.watcher.fresh.runs()
        self.watcher.fresh = Coverage()
        self.runs = self.watcher.plugged.runs()
        if self.tracker is not None:
            for s, n in fresh:
                self.tracker.protect(s, n)
        return fresh

    def start_tracking(self) -> None:
        ram = self.region.mr.ram
        shmem = getattr(ram, "fd", None) is not None
        self.tracker = uffd.WriteTracker(ram.host_address, self.region.size, shmem=shmem)  # type: ignore[union-attr]
        for s, n in self.runs:
            self.tracker.protect(s, n)

    def scan(self) -> Runs:
        assert self.tracker is not None
        out: Runs = []
        for s, n in self.runs:
            out.extend(self.tracker.scan_reset(s, n))
        return out

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        if self.watcher is not None and self.region.device is not None:
            self.region.device.unregister_listener(self.watcher)
            self.watcher = None


def _tracking_problem(regions: list[_Region]) -> str | None:
    why = uffd.available()
    if why is not None:
        return why
    for r in regions:
        if r.region.page_size != PAGE:
            return f"region {r.region.mr.name!r} has {r.region.page_size:#x}-byte pages (tracked: 4 KiB only)"
    return None


class PrecopySource:
    """One precopy over a connected socket (module rules). :meth:`run` returns once the
    destination confirmed; ``cancel`` (an Event) stops it between sections."""

    def __init__(
        self,
        address_space: AddressSpace,
        devices: Sequence[VirtioMem],
        sock: socket.socket,
        guest: GuestControl | None,
        params: PrecopyParams | None = None,
        *,
        progress: ProgressFn | None = None,
        status_timeout: float | None = STATUS_TIMEOUT,
        io_timeout: float | None = None,
        guard: AbstractContextManager[object] | None = None,
    ) -> None:
        self.space = address_space
        self.guard: AbstractContextManager[object] = guard if guard is not None else contextlib.nullcontext()
        self.resizable = bool(params is not None and params.allow_resize and guard is not None)
        self.devices = list(devices)
        self.sock = sock
        self.guest = guest
        self.params = params or PrecopyParams()
        self.progress = progress
        self.status_timeout = status_timeout
        self.io_timeout = io_timeout if io_timeout is not None else sock.gettimeout()
        self.ret = _ReturnPath(sock, self.io_timeout)
        self.stats = PrecopyStats()
        self.cancel = threading.Event()
        self.algo = default_checksum()
        self.counter = Counter()
        self._paused = False
        self._stack: contextlib.ExitStack | None = None

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")

    def _send_list(self, out: _Batcher, region: _Region, offsets: list[int]) -> int:
        """Single dirty pages as PAGE_LIST sections (one header, one checksum and one
        copy call for up to MAX_LIST_PAGES pages)."""
        out.make_room(len(offsets) * PAGE)  # no flush (network wait) while holding the guard
        if region.watcher is None:
            data = out.gather(region.pages, offsets)
        else:
            with self.guard:  # no plug/unplug while we read (module rules)
                plugged = region.watcher.plugged
                offsets = [o for o in offsets if plugged.covers(o, o + PAGE)]
                if not offsets:
                    return 0
                data = out.gather(region.pages, offsets)
        out.add(page_list_header(region.region.index, offsets, data, self.algo), data)
        self.counter.pages(data.nbytes)
        self._check_cancel()
        return data.nbytes

    def _send_runs(self, out: _Batcher, region: _Region, runs: Runs, live: bool) -> int:
        sent = 0
        view, index = region.view, region.region.index
        singles: list[int] = []
        for s, n in runs:
            if n <= LIST_RUN and region.region.page_size == PAGE:
                for p in range(s, s + n, PAGE):
                    singles.append(p)
                    if len(singles) == MAX_LIST_PAGES:
                        sent += self._send_list(out, region, singles)
                        singles = []
                continue
            end = s + n
            while s < end:
                k = min(CHUNK, end - s)
                if not live:
                    parts = [(s, view[s : s + k])]
                elif region.watcher is None:
                    parts = [(s, out.copy(view[s : s + k]))]
                else:
                    out.make_room(k)  # no flush (network wait) while holding the guard
                    with self.guard:  # no plug/unplug while we read (module rules)
                        parts = [(a, out.copy(view[a : a + b])) for a, b in region.clip(s, s + k)]
                for a, data in parts:
                    out.add(page_header(index, a, data, self.algo), data)
                    self.counter.pages(data.nbytes)
                    sent += data.nbytes
                s += k
            self._check_cancel()
        if singles:
            sent += self._send_list(out, region, singles)
        return sent

    def _device_changes(self, out: _Batcher, regions: list[_Region], dirty: list[Runs]) -> list[Runs]:
        """Under the guard: new DEVICE states for devices whose plugged set changed,
        the newly plugged ranges added to the dirty runs, the rest clipped to the
        plugged set."""
        sections: list[bytes] = []
        new: list[Runs] = []
        with self.guard:
            for r, d in zip(regions, dirty, strict=True):
                w = r.watcher
                if w is None or not w.changed:
                    new.append(d)
                    continue
                w.changed = False
                assert r.region.device is not None
                sections.append(encode_device(r.region.index, r.region.device.save_state()))
                kept = [c for a, b in d for c in w.plugged.clip(a, a + b)]
                new.append(merge(kept, r.take_fresh()))
        for sec in sections:  # sent outside the guard: a send may wait on the network
            out.add(sec)
            self.counter.meta()
        return new

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.stats)

    def run(self) -> PrecopyStats:
        st = self.stats
        t0 = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                self._stack = stack
                if not self.resizable:
                    stack.enter_context(frozen(self.devices))
                with self.guard:
                    regions = [_Region(r, self.resizable) for r in collect_regions(self.space, self.devices)]
                try:
                    return self._run(regions, t0)
                finally:
                    with self.guard:
                        for r in regions:
                            r.close()
        except BaseException:
            st.status = "failed" if not self.cancel.is_set() else "cancelled"
            if self._paused and self.guest is not None:
                self.guest.resume()
                self._paused = False
            raise

    def _run(self, regions: list[_Region], t0: float) -> PrecopyStats:
        st, p = self.stats, self.params
        st.fallback = _tracking_problem(regions)
        if st.fallback is None:
            for r in regions:
                r.start_tracking()
        st.total_bytes = sum(n for r in regions for _s, n in r.runs)
        ret = self.ret
        out = _Batcher(self.sock, st, p, self.cancel, ret)
        flags = StreamFlags.LIVE
        out.add(encode_stream_header(flags, self.algo))
        for r in regions:
            out.add(encode_region(r.region.info()))
            self.counter.meta()
        with self.guard:
            states = [
                (r.region.index, r.region.device.save_state()) for r in regions if r.region.device is not None
            ]
        for index, state in states:
            out.add(encode_device(index, state))
            self.counter.meta()
        st.setup_time = time.perf_counter() - t0
        st.status = "active"
        self._report()
        dirty: list[Runs] = [list(r.runs) for r in regions]
        remaining = st.total_bytes
        best = remaining
        while True:
            self._check_cancel()
            if self.resizable:
                dirty = self._device_changes(out, regions, dirty)
            st.rounds += 1
            t_round = time.perf_counter()
            sent = sum(self._send_runs(out, r, d, True) for r, d in zip(regions, dirty, strict=True))
            out.add(encode_round(st.rounds, remaining))
            self.counter.meta()
            out.flush()
            st.round_bytes.append(sent)
            st.page_bytes += sent
            elapsed = max(time.perf_counter() - t_round, 1e-6)
            if sent:
                st.bandwidth = sent / elapsed
            if st.fallback is not None:
                dirty = [list(r.runs) for r in regions]
                break
            dirty = [r.scan() for r in regions]
            remaining = sum(n for d in dirty for _s, n in d)
            if self.resizable:  # plugged since the last round: sent whole in the next one
                with self.guard:
                    remaining += sum(n for r in regions if r.watcher for _s, n in r.watcher.fresh.runs())
            st.remaining = remaining
            st.dirty_rate = remaining / elapsed
            st.expected_downtime = remaining / st.bandwidth if st.bandwidth else 0.0
            self._report()
            stalled = remaining >= best and st.rounds >= 5
            best = min(best, remaining)
            if st.expected_downtime <= p.downtime_limit or st.rounds >= p.max_rounds or stalled:
                break
        # switchover
        st.status = "device"
        t_down = time.perf_counter()
        if self.guest is not None:
            self.guest.pause()
            self._paused = True
        if self.resizable and self._stack is not None:
            with self.guard:  # a request in progress ends first
                self._stack.enter_context(frozen(self.devices))
            dirty = self._device_changes(out, regions, dirty)
        if st.fallback is None:
            dirty = [merge(d, r.scan()) for r, d in zip(regions, dirty, strict=True)]
        out.throttle = False
        sent = sum(self._send_runs(out, r, d, False) for r, d in zip(regions, dirty, strict=True))
        st.round_bytes.append(sent)
        st.page_bytes += sent
        for r in regions:
            if r.region.device is not None:
                out.add(encode_device(r.region.index, r.region.device.save_state()))
                self.counter.meta()
        out.add(encode_end(self.counter.end()))
        out.flush()
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(self.status_timeout)
        error = ret.verdict(self.status_timeout)
        self._check_cancel()
        if error is not None:
            raise MigrationError(f"the destination refused the migration: {error}")
        st.downtime = time.perf_counter() - t_down
        st.total_time = time.perf_counter() - t0
        st.remaining = 0
        st.pages_sent = self.counter.page_bytes // PAGE
        st.status = "completed"
        self._report()
        return st


def precopy_to(
    host: str,
    port: int,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    guest: GuestControl | None,
    params: PrecopyParams | None = None,
    *,
    progress: ProgressFn | None = None,
    timeout: float | None = STATUS_TIMEOUT,
    io_timeout: float = IO_TIMEOUT,
    on_start: Callable[[PrecopySource], None] | None = None,
    guard: AbstractContextManager[object] | None = None,
) -> PrecopyStats:
    """Precopy to a destination listening on ``host:port`` (:func:`receive_live` there).
    ``on_start`` gets the source before anything is sent (``source.cancel.set()`` and
    ``source.sock.shutdown`` cancel it). ``guard``: the lock of plug/unplug, for
    ``params.allow_resize`` (module rules). Raises MigrationError (the source runs on,
    unchanged) or OSError for connection problems."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(io_timeout)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        src = PrecopySource(
            address_space, devices, sock, guest, params, progress=progress, status_timeout=timeout,
            io_timeout=io_timeout, guard=guard,
        )  # fmt: skip
        if on_start is not None:
            on_start(src)
        try:
            try:
                return src.run()
            except PeerAnswered as exc:
                try:
                    error = src.ret.verdict(timeout)
                except (MigrationError, OSError):
                    error = None
                raise MigrationError(f"the destination refused the migration: {error or exc}") from exc
            except TimeoutError:
                raise MigrationError(
                    f"the destination read nothing for {io_timeout:g} s; migration abandoned"
                ) from None
            except OSError as exc:
                raise MigrationError(f"connection lost: {exc.strerror or exc}") from None
        except MigrationError:
            if src.cancel.is_set():
                raise MigrationError("migration cancelled") from None
            raise


# -- destination ------------------------------------------------------------------------------
