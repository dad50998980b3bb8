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
  most every :data:`~ramdiscard.migration.returnpath.ACK_INTERVAL` s while data
  arrives) ahead of its final status.
  The source reads these between batches and while it throttles: when stream bytes
  are outstanding and the acknowledged position has not moved for ``io_timeout``
  seconds, the destination is stalled (it read nothing) and the migration fails, even
  while the kernel's socket buffers could still absorb data (a throttled source would
  otherwise notice only once both buffers are full).
* Cancel (``cancel`` set, normally together with ``sock.shutdown``) is honoured within
  one send call or :data:`~ramdiscard.migration.batcher.CANCEL_POLL` s of a throttling
  pause, and always reported as "migration cancelled".
* On failure or cancel (``cancel`` set, the socket shut down, the destination refusing or
  stalling past the socket timeout) the guest is resumed, the trackers closed (memory
  unprotected) and the devices unfrozen: the source runs on as before. On success the
  guest stays paused (``postmigrate``); the caller decides.
* Postcopy (``switch`` given, :mod:`ramdiscard.migration.postcopy_source`): the devices
  are frozen from setup, and only convergence (the downtime check) ends the rounds as a
  precopy; rounds shorter than :data:`MIN_ROUND` wait out the rest (or the switch).
  Once ``switch`` is set (looked at between rounds and after every run or page list
  sent) the rounds stop: the guest is paused, the last scan is merged with what the
  interrupted round had not sent yet (pages sent and clean since are up to date on the
  destination), the DEVICE states, one POSTCOPY section per region with those runs
  (:attr:`PrecopySource.handover`) and END go out, and :meth:`PrecopySource.run`
  returns with the guest left paused (status ``device``; the caller owns it from
  there, a failure before END went out resumes it).
* Receiving is :mod:`ramdiscard.migration.live_load`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ramdiscard.migration.batcher import CHUNK, Batcher
from ramdiscard.migration.busy import frozen
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.layout import collect_regions
from ramdiscard.migration.precopy_types import (
    GuestControl,
    PrecopyParams,
    PrecopyStats,
)
from ramdiscard.migration.returnpath import ReturnPath
from ramdiscard.migration.runs import Runs, merge, subtract
from ramdiscard.migration.stream import (
    MAX_LIST_PAGES,
    Counter,
    MigrationError,
    StreamFlags,
    encode_device,
    encode_end,
    encode_handover,
    encode_region,
    encode_round,
    encode_stream_header,
    page_header,
    page_list_header,
)
from ramdiscard.migration.tracking import PAGE, TrackedRegion, tracking_problem
from ramdiscard.migration.transport import (
    IO_TIMEOUT,
    STATUS_TIMEOUT,
    PeerAnswered,
)

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

__all__ = ["GuestControl", "PrecopyParams", "PrecopySource", "PrecopyStats", "precopy_to"]

LIST_RUN = 16 * PAGE
"""Dirty runs up to this long go out page by page in PAGE_LIST sections."""
MIN_ROUND = 0.05
"""Shortest precopy round of a postcopy (seconds; module rules)."""


class _Switch(Exception):
    """The postcopy switch was requested in the middle of a round."""


ProgressFn = Callable[[PrecopyStats], None]


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
        switch: threading.Event | None = None,
        stats: PrecopyStats | None = None,
    ) -> None:
        self.space = address_space
        self.guard: AbstractContextManager[object] = guard if guard is not None else contextlib.nullcontext()
        self.switch = switch
        self.resizable = bool(params and params.allow_resize and guard is not None and switch is None)
        self.devices = list(devices)
        self.sock = sock
        self.guest = guest
        self.params = params or PrecopyParams()
        self.progress = progress
        self.status_timeout = status_timeout
        self.io_timeout = io_timeout if io_timeout is not None else sock.gettimeout()
        self.ret = ReturnPath(sock, self.io_timeout)
        self.stats = stats if stats is not None else PrecopyStats()
        self.cancel = threading.Event()
        self.handover: list[Runs] | None = None
        """After a postcopy switch: per region, the runs the destination lacks."""
        self.paused_at = 0.0
        self._rounds_on = False
        self._sent: list[Runs] = []
        self._round_dirty: list[Runs] = []
        self.algo = default_checksum()
        self.counter = Counter()
        self._paused = False
        self._stack: contextlib.ExitStack | None = None

    def _check_cancel(self) -> None:
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")
        if self._rounds_on and self.switch is not None and self.switch.is_set():
            raise _Switch

    def _send_list(self, out: Batcher, region: TrackedRegion, offsets: list[int]) -> int:
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
        if self.switch is not None:
            self._sent[region.region.index].extend((o, PAGE) for o in offsets)
        self._check_cancel()
        return data.nbytes

    def _send_runs(self, out: Batcher, region: TrackedRegion, runs: Runs, live: bool) -> int:
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
                    if self.switch is not None:
                        self._sent[index].append((a, data.nbytes))
                s += k
            self._check_cancel()
        if singles:
            sent += self._send_list(out, region, singles)
        return sent

    def _device_changes(self, out: Batcher, regions: list[TrackedRegion], dirty: list[Runs]) -> list[Runs]:
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
                    regions = [
                        TrackedRegion(r, self.resizable) for r in collect_regions(self.space, self.devices)
                    ]
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

    def _rounds(self, out: Batcher, regions: list[TrackedRegion]) -> list[Runs]:
        """The live rounds; returns the dirty runs left for the switchover. Raises
        _Switch when a postcopy switch is requested (module rules)."""
        st, p = self.stats, self.params
        dirty = self._start_round([list(r.runs) for r in regions])
        self._rounds_on = self.switch is not None
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
            if self.switch is not None and self.switch.is_set():
                raise _Switch  # before the scan: what the round sent is covered by the last one
            dirty = self._start_round([r.scan() for r in regions])
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
            if st.expected_downtime <= p.downtime_limit:
                break
            if self.switch is None and (st.rounds >= p.max_rounds or stalled):
                break
            if self.switch is not None and (left := MIN_ROUND - (time.perf_counter() - t_round)) > 0:
                self.switch.wait(left)
        self._rounds_on = False
        return dirty

    def _start_round(self, dirty: list[Runs]) -> list[Runs]:
        self._round_dirty = dirty
        self._sent = [[] for _d in dirty]
        return dirty

    def _handover(self, out: Batcher, regions: list[TrackedRegion]) -> PrecopyStats:
        """The postcopy switch (module rules)."""
        st = self.stats
        st.status = "device"
        self._rounds_on = False
        self.paused_at = time.perf_counter()
        if self.guest is not None:
            self.guest.pause()
            self._paused = True
        needed: list[Runs] = []
        for r, d, sent in zip(regions, self._round_dirty, self._sent, strict=True):
            if st.fallback is not None:
                needed.append(list(r.runs))  # nothing tells which pages changed
            else:
                needed.append(merge(subtract(d, merge(sent, [])), r.scan()))
        out.throttle = False
        for r in regions:
            if r.region.device is not None:
                out.add(encode_device(r.region.index, r.region.device.save_state()))
                self.counter.meta()
        for r, runs in zip(regions, needed, strict=True):
            out.add(encode_handover(r.region.index, runs))
            self.counter.meta()
        out.add(encode_end(self.counter.end()))
        out.flush()
        self.handover = needed
        self._paused = False  # the caller's from here (module rules)
        return st

    def _run(self, regions: list[TrackedRegion], t0: float) -> PrecopyStats:
        st, p = self.stats, self.params
        st.fallback = tracking_problem(regions)
        if st.fallback is None:
            for r in regions:
                r.start_tracking()
        st.total_bytes = sum(n for r in regions for _s, n in r.runs)
        ret = self.ret
        out = Batcher(self.sock, st, p, self.cancel, ret)
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
        try:
            dirty = self._rounds(out, regions)
        except _Switch:
            return self._handover(out, regions)
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
