"""Postcopy's fault handler: a process of its own that owns the destination's userfaultfd.

Rules (live-migration.md pitfall 1: a handler thread inside the process whose Python code
touches guest memory can wait for the GIL held by the faulting thread, and nobody then
places the page):

* :func:`spawn` starts ``python -m ramdiscard.migration.postcopy_faults`` with the
  userfaultfd (opened by the destination, so every placement acts on the destination's
  memory), the main and priority channels and a control socket inherited. The
  destination sends the configuration (:class:`HandlerConfig`) as one JSON line on the
  control socket (``present``: the runs the destination kept from the precopy, placed
  already); the handler answers with one JSON line: ``{"event": "done", ...}``
  with its figures once every plugged page is placed and the source said its background
  copy is complete, or ``{"event": "error", "message": ...}``. It exits when the control
  socket closes (the destination ended or died).
* Threads of the handler: the fault reader (a fault in a plugged page not placed yet is
  requested once, as the pages not placed yet around it within the aligned
  :data:`WINDOW` (clipped to the plugged run), on the priority channel; a fault
  outside every plugged run is resolved at once with a zero page and never sent to the
  source), the main-channel reader (background pages) and the priority-channel reader
  (answers). Every page message is checked against the
  plugged runs before it is placed (UFFDIO_COPY; pages present already are skipped).
* Fault latency: from reading a fault message to its page being placed, per faulting
  page. A request unanswered for ``io_timeout`` seconds, a main channel silent that long
  while pages are missing, or a malformed message ends the handler with an error.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

from ramdiscard.hostmem import uffd_missing as um
from ramdiscard.migration import postcopy_wire as w
from ramdiscard.migration.stream import StreamError

SWITCH_INTERVAL = 0.0002
"""The handler's GIL switch interval: a thread waking with a fault or an answer takes
the GIL from a background reader within this, not Python's default 5 ms."""
WINDOW = 64 * 1024
"""Bytes requested per fault (aligned, clipped to the plugged run): amortises round trips."""


@dataclass
class HandlerConfig:
    """Per region: host address, size and plugged runs (ascending ``(offset, length)``)."""

    addrs: list[int]
    sizes: list[int]
    plugged: list[list[tuple[int, int]]]
    io_timeout: float = 30.0
    window: int = WINDOW
    present: list[list[tuple[int, int]]] = field(default_factory=list)
    """Per region, runs inside the plugged runs already in place (kept from the precopy)."""
    extra: dict[str, Any] = field(default_factory=dict)


def spawn(
    uffd: int, main: socket.socket, prio: socket.socket
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """Start the handler process (module rules); returns it and the control socket."""
    mine, theirs = socket.socketpair()
    fds = (uffd, main.fileno(), prio.fileno(), theirs.fileno())
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ramdiscard.migration.postcopy_faults", *map(str, fds)],
            pass_fds=fds, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except BaseException:
        mine.close()
        raise
    finally:
        theirs.close()
    return proc, mine


class _Handler:
    def __init__(self, uffd: int, main: socket.socket, prio: socket.socket, cfg: HandlerConfig) -> None:
        self.fd, self.main, self.prio, self.cfg = uffd, main, prio, cfg
        self.lock = threading.Lock()
        # One flag per page of each plugged run (a 1 TiB region with 1 GiB plugged: 256 KiB).
        self.placed = [[bytearray(n // w.PAGE) for _s, n in runs] for runs in cfg.plugged]
        self.starts = [[s for s, _n in runs] for runs in cfg.plugged]
        self.missing = sum(n for runs in cfg.plugged for _s, n in runs) // w.PAGE
        for region, runs in enumerate(cfg.present):
            for s, n in runs:
                run = self.run_of(region, s)
                if run is None or s + n > run[1] + run[2]:
                    raise StreamError(f"postcopy: kept run [{s:#x}, +{n:#x}) of region {region} not plugged")
                a, b = (s - run[1]) // w.PAGE, (s + n - run[1]) // w.PAGE
                flags = self.placed[region][run[0]]
                self.missing -= (b - a) - flags.count(1, a, b)
                flags[a:b] = b"\x01" * (b - a)
        self.pending: dict[tuple[int, int], float] = {}
        self.requested: dict[tuple[int, int], float] = {}
        self.latencies: list[float] = []
        self.faults = self.zero_faults = self.requests = 0
        self.background = self.priority = 0
        self.bg_done = False
        self.error: str | None = None
        self.finished = threading.Event()
        self.t0 = time.perf_counter()

    def run_of(self, region: int, offset: int) -> tuple[int, int, int] | None:
        """(index, start, length) of the plugged run holding ``offset``, if any."""
        runs = self.cfg.plugged[region]
        i = bisect_right(self.starts[region], offset) - 1
        if i >= 0 and offset < runs[i][0] + runs[i][1]:
            return i, runs[i][0], runs[i][1]
        return None

    def fail(self, message: str) -> None:
        with self.lock:
            if self.error is None:
                self.error = message
        self.finished.set()

    def _check_done(self) -> None:
        if self.bg_done and self.missing == 0:
            self.finished.set()

    # -- placing -----------------------------------------------------------------------

    def place(self, region: int, offset: int, src: int | None, length: int) -> None:
        run = self.run_of(region, offset)
        if run is None or offset + length > run[1] + run[2]:
            raise StreamError(f"postcopy: pages [{offset:#x}, +{length:#x}) of region {region} not plugged")
        dst = self.cfg.addrs[region] + offset
        if src is None:
            um.zeropage(self.fd, dst, length)
        else:
            um.copy(self.fd, dst, src, length)
        now = time.perf_counter()
        a, b = offset // w.PAGE, (offset + length) // w.PAGE
        base = run[1] // w.PAGE
        with self.lock:
            flags = self.placed[region][run[0]]
            self.missing -= (b - a) - flags.count(1, a - base, b - base)
            flags[a - base : b - base] = b"\x01" * (b - a)
            for p in range(a, b):
                t = self.pending.pop((region, p), None)
                if t is not None:
                    self.latencies.append(now - t)
                self.requested.pop((region, p), None)
            self._check_done()

    def read_pages(self, sock: socket.socket, kinds: bytes, main: bool) -> None:
        head = bytearray(w.MSG.size)
        buf = bytearray(w.MAX_PIECE)
        addr = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
        try:
            while not self.finished.is_set():
                if not _read(sock, memoryview(head)):
                    if main and not self.bg_done:
                        raise StreamError("postcopy: the source closed the main channel early")
                    return
                kind, region, offset, length = w.check(head, kinds, self.cfg.sizes)
                if kind == w.DN:
                    with self.lock:
                        self.bg_done = True
                        self._check_done()
                    if main:
                        return
                    continue
                if kind == w.PG:
                    if not _read(sock, memoryview(buf)[:length]):
                        raise StreamError("postcopy: channel closed inside a page message")
                    self.place(region, offset, addr, length)
                else:
                    self.place(region, offset, None, length)
                if main:
                    self.background += length
                else:
                    self.priority += length
        except TimeoutError:
            self.fail(f"postcopy: the source sent nothing for {self.cfg.io_timeout:g} s")
        except Exception as exc:
            self.fail(str(exc) or type(exc).__name__)

    # -- faults ------------------------------------------------------------------------

    def serve_faults(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        bases = self.cfg.addrs
        try:
            while not self.finished.is_set():
                if not poller.poll(50):
                    self._check_stale()
                    continue
                try:
                    data = os.read(self.fd, 64 * um.MSG.size)
                except BlockingIOError:
                    continue
                now = time.perf_counter()
                for i in range(0, len(data) - um.MSG.size + 1, um.MSG.size):
                    address = um.parse_fault(data[i : i + um.MSG.size])
                    if address is None:
                        continue
                    page_addr = address & ~(w.PAGE - 1)
                    for region, base in enumerate(bases):
                        if base <= page_addr < base + self.cfg.sizes[region]:
                            self._fault(region, page_addr - base, now)
                            break
        except Exception as exc:
            self.fail(str(exc) or type(exc).__name__)

    def _fault(self, region: int, offset: int, now: float) -> None:
        run = self.run_of(region, offset)
        page = offset // w.PAGE
        if run is None:
            um.zeropage(self.fd, self.cfg.addrs[region] + offset, w.PAGE)
            with self.lock:
                self.zero_faults += 1
            return
        i, run_start, run_len = run
        base = run_start // w.PAGE
        flags = self.placed[region][i]
        with self.lock:
            if flags[page - base]:
                return
            self.faults += 1
            self.pending.setdefault((region, page), now)
            if (region, page) in self.requested:
                return
            win = self.cfg.window
            lo = max(run_start, offset - offset % win) // w.PAGE
            hi = min(run_start + run_len, offset - offset % win + win) // w.PAGE
            first, last = page, page + 1  # the missing pages around the fault, in the window
            while first > lo and not flags[first - 1 - base]:
                first -= 1
            while last < hi and not flags[last - base]:
                last += 1
            start, end = first * w.PAGE, last * w.PAGE
            for p in range(first, last):
                self.requested[(region, p)] = now
            self.requests += 1
        self.prio.sendall(w.encode(w.RQ, region, start, end - start))

    def _check_stale(self) -> None:
        with self.lock:
            oldest = min(self.requested.values(), default=None)
        if oldest is not None and time.perf_counter() - oldest > self.cfg.io_timeout:
            self.fail(f"postcopy: a page request went unanswered for {self.cfg.io_timeout:g} s")

    def figures(self) -> dict[str, Any]:
        return {
            "faults": self.faults, "zero_faults": self.zero_faults, "requests": self.requests,
            "background_bytes": self.background, "priority_bytes": self.priority,
            "latencies": self.latencies, "seconds": time.perf_counter() - self.t0,
        }  # fmt: skip


def _read(sock: socket.socket, view: memoryview) -> bool:
    """Fill ``view``; False on a clean close before its first byte."""
    pos = 0
    while pos < view.nbytes:
        got = sock.recv_into(view[pos:])
        if got == 0:
            if pos == 0:
                return False
            raise StreamError("postcopy: channel closed inside a message")
        pos += got
    return True


def _main(argv: list[str]) -> int:
    uffd, main_fd, prio_fd, ctl_fd = (int(a) for a in argv)
    sys.setswitchinterval(SWITCH_INTERVAL)
    ctl = socket.socket(fileno=ctl_fd)
    line = ctl.makefile("rb").readline()
    if not line:
        return 0
    raw = json.loads(line)
    cfg = HandlerConfig(
        addrs=raw["addrs"], sizes=raw["sizes"],
        plugged=[[(r[0], r[1]) for r in runs] for runs in raw["plugged"]],
        io_timeout=raw["io_timeout"], window=raw["window"],
        present=[[(r[0], r[1]) for r in runs] for runs in raw.get("present", [])],
    )  # fmt: skip
    main = socket.socket(fileno=main_fd)
    prio = socket.socket(fileno=prio_fd)
    main.settimeout(cfg.io_timeout)
    h = _Handler(uffd, main, prio, cfg)
    threads = [
        threading.Thread(target=h.read_pages, args=(main, w.PG + w.DN, True), daemon=True),
        threading.Thread(target=h.read_pages, args=(prio, w.PG + w.ZR, False), daemon=True),
        threading.Thread(target=h.serve_faults, daemon=True),
    ]
    for t in threads:
        t.start()

    def watch_control() -> None:
        ctl.recv(1)  # EOF: the destination ended or died
        h.fail("postcopy: the destination went away")

    threading.Thread(target=watch_control, daemon=True).start()
    h.finished.wait()
    if h.error is not None:
        msg: dict[str, Any] = {"event": "error", "message": h.error}
    else:
        msg = {"event": "done", **h.figures()}
    ctl.sendall(json.dumps(msg).encode() + b"\n")
    ctl.recv(1)  # until the destination has unregistered and closes
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
