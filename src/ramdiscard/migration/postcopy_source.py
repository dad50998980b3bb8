"""Postcopy, the source side: a precopy that can hand the guest over before its memory.

Rules (live-migration.md; wire in :mod:`ramdiscard.migration.postcopy_wire`):

* :meth:`PostcopySource.run` connects the main channel, sends its preamble (a
  destination that cannot take a postcopy refuses at once, the guest still running
  here) and runs a precopy on it (:class:`~ramdiscard.migration.precopy.PrecopySource`
  with ``switch`` = :attr:`PostcopySource.start`, QEMU's flow): dirty-tracked rounds over
  the populated runs, status ``active``, the devices frozen (BUSY, as QEMU's
  ``virtio_mem_is_busy``) until the end. If the rounds converge before
  :attr:`PostcopySource.start` is set (``migrate-start-postcopy``), it completes as a
  precopy (``completed``, the guest paused, :attr:`PostcopyStats.switched` False).
* Switchover (``start`` set at any point of the rounds, before the first one too): the
  guest is paused, the last dirty scan taken, the device states and, per region, the runs
  the destination lacks (never sent, or written since they were sent; it drops what it
  holds of them) go out, then END; the priority channel is connected; status
  ``postcopy-active``. ``downtime`` is the pause up to that point.
* Then exactly those runs (``needed``; pages sent clean during the rounds never again)
  go out in ascending 1 MiB pieces on the main channel, pages already sent on request
  skipped, then ``DN`` (``max_bandwidth``: at most that many bytes per second for the
  rounds and this background copy; answers to requests are never held back). A request
  (``RQ`` on the priority channel) is answered at once with the populated parts of its
  range, on the priority channel when ``preempt`` (QEMU's ``postcopy-preempt``), else
  on the main channel between two background pieces, never after ``DN`` (the pages it
  takes are marked and sent under the main channel's lock). A requested range that is not
  populated is answered ``ZR`` and counted in :attr:`PostcopyStats.unplugged_requests`
  (a correct destination never asks: it resolves such faults itself).
* Completion only when the destination says ``OK`` (every page placed, devices
  loaded): status ``completed``, the guest stays paused (``postmigrate``).
* Failure or cancel before the switchover's END went out: the guest runs on, nothing
  changed. After it (destination gone or refusing, channels silent for ``io_timeout``,
  cancel): the guest stays **paused** with its memory, pins and plugged state intact
  (the destination may have run the guest meanwhile: resuming here could run it twice);
  the devices are unfrozen; ``cont`` resumes it from the switchover state.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.migration import postcopy_wire as w
from ramdiscard.migration.busy import frozen
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.precopy import GuestControl, PrecopyParams, PrecopySource, PrecopyStats
from ramdiscard.migration.runs import Runs
from ramdiscard.migration.stream import MigrationError, StreamError
from ramdiscard.migration.transport import IO_TIMEOUT, STATUS_TIMEOUT, PeerAnswered, SocketReader

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem


@dataclass
class PostcopyStats(PrecopyStats):
    """Precopy's figures plus postcopy's own."""

    requests: int = 0
    request_bytes: int = 0
    unplugged_requests: int = 0
    background_bytes: int = 0
    switched: bool = False
    needed_bytes: int = 0
    """Bytes the destination lacked at the switchover (what the background copy sends)."""


class _Regions:
    """The source's populated runs, what the destination lacks of them (``needed``) and
    what was sent of that, per region."""

    def __init__(self, regions: list[RamRegion], needed: list[Runs]) -> None:
        self.regions = regions
        self.views = [r.view for r in regions]
        self.runs = [r.populated_runs() for r in regions]
        self.starts = [[s for s, _n in runs] for runs in self.runs]
        self.needed = needed
        # One flag per page of each populated run (not per page of the region); 1: the
        # destination has it (sent clean during the rounds, or sent since).
        self.sent = [[bytearray(b"\x01") * (n // w.PAGE) for _s, n in runs] for runs in self.runs]
        for index, runs in enumerate(needed):
            for s, n in runs:
                for i, a, b in self._pieces(index, s, s + n):
                    self.sent[index][i][a:b] = bytes(b - a)
        self.lock = threading.Lock()

    def _pieces(self, index: int, start: int, end: int) -> list[tuple[int, int, int]]:
        """(run index, first page, end page) of the populated parts of ``[start, end)``."""
        out = []
        i = max(0, bisect_right(self.starts[index], start) - 1)
        runs = self.runs[index]
        while i < len(runs) and runs[i][0] < end:
            s, n = runs[i]
            a, b = max(s, start), min(s + n, end)
            if a < b:
                out.append((i, (a - s) // w.PAGE, (b - s) // w.PAGE))
            i += 1
        return out

    def clip(self, index: int, start: int, end: int) -> list[tuple[int, int, bool]]:
        """``[start, end)`` cut into (offset, length, populated) pieces."""
        out: list[tuple[int, int, bool]] = []
        pos = start
        for s, n in self.runs[index]:
            a, b = max(s, pos), min(s + n, end)
            if a >= b:
                continue
            if a > pos:
                out.append((pos, a - pos, False))
            out.append((a, b - a, True))
            pos = b
        if pos < end:
            out.append((pos, end - pos, False))
        return out

    def mark(self, index: int, start: int, end: int) -> None:
        """Mark the populated pages of ``[start, end)`` sent."""
        with self.lock:
            for i, a, b in self._pieces(index, start, end):
                self.sent[index][i][a:b] = b"\x01" * (b - a)

    def take(self, index: int, start: int, end: int) -> list[tuple[int, int]]:
        """The populated pages of ``[start, end)`` not sent yet, as (offset, length)
        runs inside one populated run each, now marked sent."""
        out = []
        with self.lock:
            for i, a, b in self._pieces(index, start, end):
                flags, base = self.sent[index][i], self.runs[index][i][0]
                p = flags.find(0, a, b)
                while p >= 0:
                    q = flags.find(1, p, b)
                    q = b if q < 0 else q
                    flags[p:q] = b"\x01" * (q - p)
                    out.append((base + p * w.PAGE, (q - p) * w.PAGE))
                    p = flags.find(0, q, b)
        return out


class PostcopySource:
    """One postcopy to ``host:port`` (module rules). ``start`` switches over, ``cancel``
    (with ``shutdown`` of the sockets, see :meth:`abort`) stops it. ``params``: the
    rounds' downtime limit and the bandwidth limit (``max_bandwidth`` overrides it)."""

    def __init__(
        self,
        address_space: AddressSpace,
        devices: Sequence[VirtioMem],
        host: str,
        port: int,
        guest: GuestControl | None,
        *,
        preempt: bool = True,
        max_bandwidth: int = 0,
        params: PrecopyParams | None = None,
        timeout: float | None = STATUS_TIMEOUT,
        io_timeout: float = IO_TIMEOUT,
        progress: Callable[[PostcopyStats], None] | None = None,
    ) -> None:
        self.space, self.devices, self.addr = address_space, list(devices), (host, port)
        self.guest, self.preempt = guest, preempt
        self.params = params if params is not None else PrecopyParams()
        self.params.allow_resize = False
        if max_bandwidth:
            self.params.max_bandwidth = max_bandwidth
        self.timeout, self.io_timeout = timeout, io_timeout
        self.progress = progress
        self.stats = PostcopyStats()
        self.start = threading.Event()
        self.cancel = threading.Event()
        self.socks: list[socket.socket] = []
        self._main_lock = threading.Lock()
        self._error: BaseException | None = None

    @property
    def max_bandwidth(self) -> int:
        return self.params.max_bandwidth

    @max_bandwidth.setter
    def max_bandwidth(self, value: int) -> None:
        self.params.max_bandwidth = value

    def abort(self) -> None:
        """Cancel from another thread: every channel is shut down."""
        self.cancel.set()
        for s in list(self.socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _report(self, status: str | None = None) -> None:
        if status is not None:
            self.stats.status = status
        if self.progress is not None:
            self.progress(self.stats)

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.socks.append(sock)
        sock.settimeout(self.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        return sock

    def run(self) -> PostcopyStats:
        """Raises MigrationError (module rules say in which state the source is left)."""
        st, t0 = self.stats, time.perf_counter()
        try:
            with frozen(self.devices):
                main = self._connect()
                if self.cancel.is_set():
                    raise MigrationError("migration cancelled")
                main.sendall(w.MAIN_PREAMBLE)
                pre = PrecopySource(
                    self.space, self.devices, main, self.guest, self.params, status_timeout=self.timeout,
                    io_timeout=self.io_timeout, switch=self.start, stats=st,
                    progress=lambda _s: self._report(),
                )  # fmt: skip
                pre.cancel = self.cancel
                try:
                    pre.run()
                except PeerAnswered as exc:
                    try:
                        error = pre.ret.verdict(self.timeout)
                    except (MigrationError, OSError):
                        error = None
                    raise MigrationError(f"the destination refused the migration: {error or exc}") from exc
                except TimeoutError:
                    raise MigrationError(
                        f"the destination read nothing for {self.io_timeout:g} s; migration abandoned"
                    ) from None
                if pre.handover is not None:
                    self._switchover(main, pre, t0)
        except BaseException as exc:
            st.status = "cancelled" if self.cancel.is_set() else "failed"
            if isinstance(exc, MigrationError):
                if self.cancel.is_set():
                    raise MigrationError("migration cancelled") from None
                raise
            if isinstance(exc, OSError):
                if self.cancel.is_set():
                    raise MigrationError("migration cancelled") from None
                raise MigrationError(f"postcopy failed: {exc.strerror or exc}") from None
            raise
        finally:
            for s in self.socks:
                s.close()
        return st

    def _switchover(self, main: socket.socket, pre: PrecopySource, t0: float) -> None:
        st = self.stats
        st.switched = True
        assert pre.handover is not None
        st.needed_bytes = st.remaining = sum(n for runs in pre.handover for _s, n in runs)
        prio = self._connect()
        prio.sendall(w.PRIORITY_HELLO)
        st.downtime = time.perf_counter() - pre.paused_at
        self._report("postcopy-active")
        # Built after the hello: the destination starts its fault handler meanwhile, and
        # no request can come before that.
        regions = _Regions(collect_regions(self.space, self.devices), pre.handover)
        answers = threading.Thread(
            target=self._serve_requests, args=(regions, prio, prio if self.preempt else main),
            name="ramdiscard-postcopy-requests", daemon=True,
        )  # fmt: skip
        answers.start()
        try:
            self._background(regions, main)
            error = pre.ret.verdict(self.timeout)
        except (OSError, MigrationError) as exc:
            if self._error is not None:
                raise MigrationError(f"postcopy failed: {self._error}") from exc
            raise
        finally:
            with contextlib.suppress(OSError):
                prio.shutdown(socket.SHUT_RDWR)
            answers.join(5)
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")
        if error is not None:
            raise MigrationError(f"the destination failed the postcopy: {error}")
        st.remaining = 0
        st.total_time = time.perf_counter() - t0
        st.page_bytes += st.background_bytes + st.request_bytes
        st.pages_sent = st.page_bytes // w.PAGE
        self._report("completed")

    def _send(self, sock: socket.socket, header: bytes, data: memoryview | None, shared: bool) -> None:
        with self._main_lock if shared else contextlib.nullcontext():
            if data is None:
                sock.sendall(header)
            else:
                n = sock.sendmsg([header, data])
                if n < len(header):
                    sock.sendall(header[n:])
                    sock.sendall(data)
                elif n - len(header) < data.nbytes:
                    sock.sendall(data[n - len(header) :])
            self.stats.stream_bytes += len(header) + (0 if data is None else data.nbytes)

    def _background(self, regions: _Regions, main: socket.socket) -> None:
        st = self.stats
        t0 = time.perf_counter()
        for index, runs in enumerate(regions.needed):
            view = regions.views[index]
            for s, n in runs:
                pos, end = s, s + n
                while pos < end:
                    if self.cancel.is_set():
                        raise MigrationError("migration cancelled")
                    k = min(w.MAX_PIECE, end - pos)
                    for a, m in regions.take(index, pos, pos + k):
                        self._send(main, w.encode(w.PG, index, a, m), view[a : a + m], True)
                        st.background_bytes += m
                        rate = self.max_bandwidth
                        while rate and (ahead := st.background_bytes / rate - (time.perf_counter() - t0)) > 0:
                            if self.cancel.wait(min(ahead, 0.05)):
                                raise MigrationError("migration cancelled")
                    st.remaining = max(0, st.remaining - k)
                    pos += k
        self._send(main, w.encode(w.DN, 0, st.background_bytes, 0), None, True)

    def _serve_requests(self, regions: _Regions, prio: socket.socket, out: socket.socket) -> None:
        st = self.stats
        sizes = [r.size for r in regions.regions]
        head = bytearray(w.MSG.size)
        reader = SocketReader(prio)
        prio.settimeout(None)
        shared = out is not prio
        try:
            while True:
                try:
                    reader.read_exact(memoryview(head))
                except StreamError:
                    return  # the destination closed the channel (done, or failed: the main channel says)
                _kind, index, offset, length = w.check(head, w.RQ, sizes)
                st.requests += 1
                # On the main channel, marking and sending under one hold of its lock: the
                # background skips pages marked sent, and its DN (after which the destination
                # reads nothing more there) must not overtake their answer.
                with self._main_lock if shared else contextlib.nullcontext():
                    hole = False
                    for a, n, populated in regions.clip(index, offset, offset + length):
                        if populated:
                            regions.mark(index, a, a + n)
                            self._send(
                                out, w.encode(w.PG, index, a, n), regions.views[index][a : a + n], False
                            )
                            st.request_bytes += n
                        else:
                            hole = True
                            self._send(out, w.encode(w.ZR, index, a, n), None, False)
                st.unplugged_requests += hole
        except (OSError, MigrationError) as exc:
            if not self.cancel.is_set():
                self._error = exc
                for s in self.socks:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
