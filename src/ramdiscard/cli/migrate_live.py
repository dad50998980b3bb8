"""``ramdiscard migrate send|receive --live``: live precopy between two processes.

Rules:

* The source keeps its guest writing (the demo guest's ``--write-rate`` writer, or a
  ``--scenario`` machine with its guest thread, consumers and ``[workload]`` writer)
  while :func:`ramdiscard.migration.precopy.precopy_to` sends its memory, with QEMU's
  ``downtime-limit`` (ms) and ``max-bandwidth`` (bytes/s) as ``--downtime-limit`` and
  ``--max-bandwidth``. The destination loads with
  :func:`ramdiscard.migration.live_load.receive_live`.
* Progress goes to stderr (:class:`LiveDisplay`): on a terminal one line rewritten in
  place every :data:`REFRESH` s; otherwise one plain line per finished round. Each shows
  the round, the dirty rate, the bytes remaining, the expected downtime and the bytes
  transferred. At the end both sides print a summary (stdout; ``--json``: one JSON
  line) with the digest of their populated memory
  (:func:`ramdiscard.migration.digest.memory_digest`), equal on both ends when the
  migration is right.
* Ctrl-C (or SIGTERM) on the source cancels the migration: the precopy runs on a worker
  thread, the main thread sets its cancel flag and shuts the socket down, waits for it
  (at most :data:`CANCEL_WAIT` s), then checks that the source runs on as before
  (plugged and pinned bytes unchanged, devices no longer frozen, no userfaultfd left,
  the writer writing again) and says so; exit 130 when intact, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO

from ramdiscard import interrupts
from ramdiscard.guest.writer import GuestWriter
from ramdiscard.hostmem import proc_status
from ramdiscard.migration.precopy import PrecopyParams, PrecopySource, PrecopyStats, precopy_to
from ramdiscard.units import format_size

if TYPE_CHECKING:
    from ramdiscard.machine.consumers import Consumer
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

REFRESH = 0.2
"""Seconds between two redraws of the progress line on a terminal."""
CANCEL_WAIT = 60.0
"""Longest wait for a cancelled migration to unwind."""
WRITER_WAIT = 10.0
"""Longest wait for the writer to show it writes again after a cancel."""
DOWNTIME_LIMIT = 300
"""``--downtime-limit`` when not given, ms (QEMU's default downtime-limit)."""


def progress_line(st: PrecopyStats) -> str:
    """One line of figures for ``st`` (module rules); "-" where no round measured it yet."""
    if st.status == "setup":
        return "setup: connecting and protecting populated memory"
    if st.status == "device":
        return f"round {st.rounds} switchover: guest paused, sending the rest ({format_size(st.remaining)})"
    measured = st.rounds >= 1 and st.bandwidth > 0 and len(st.round_bytes) >= 1
    remaining = st.remaining if measured else max(st.total_bytes - st.stream_bytes, 0)
    rate = f"{format_size(int(st.dirty_rate))}/s" if measured else "-"
    down = f"{st.expected_downtime * 1000:.1f} ms" if measured else "-"
    return (
        f"round {st.rounds}: dirty {rate}, remaining {format_size(remaining)}, "
        f"expected downtime {down}, transferred {format_size(st.stream_bytes)}"
    )


class LiveDisplay:
    """Progress of one precopy on ``out`` (module rules). :meth:`update` is the precopy's
    progress callback; :meth:`watch` starts the terminal redraw; :meth:`close` ends it."""

    def __init__(self, out: TextIO, *, tty: bool, quiet: bool) -> None:
        self.out = out
        self.tty = tty
        self.quiet = quiet
        self._lock = threading.Lock()
        self._stats: PrecopyStats | None = None
        self._printed = -1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dirty_line = False

    def watch(self, stats: PrecopyStats) -> None:
        self._stats = stats
        if self.tty and not self.quiet and self._thread is None:
            self._thread = threading.Thread(target=self._redraw, name="ramdiscard-progress", daemon=True)
            self._thread.start()

    def update(self, st: PrecopyStats) -> None:
        self._stats = st
        if self.quiet or st.status == "completed":
            return
        if self.tty:
            self._draw(st)
        elif st.status == "active" and self._printed < 0:
            self._printed = 0
            with self._lock:
                line = f"active: sending {format_size(st.total_bytes)} of populated memory"
                print(line, file=self.out, flush=True)
        elif st.rounds > self._printed and st.rounds >= 1:
            self._printed = st.rounds
            with self._lock:
                print(progress_line(st), file=self.out, flush=True)

    def _draw(self, st: PrecopyStats) -> None:
        with self._lock:
            self.out.write("\r" + progress_line(st) + "\x1b[K")
            self.out.flush()
            self._dirty_line = True

    def _redraw(self) -> None:
        while not self._stop.wait(REFRESH):
            st = self._stats
            if st is not None and st.status not in ("completed", "failed", "cancelled"):
                self._draw(st)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        with self._lock:
            if self._dirty_line:
                self.out.write("\n")
                self.out.flush()
                self._dirty_line = False


@dataclass
class Side:
    """One end's machine as the live CLI needs it."""

    space: AddressSpace
    devices: list[VirtioMem]
    lock: AbstractContextManager[Any]
    """Held while plug and unplug happen (the machine's lock, or the demo writer's)."""
    writer: GuestWriter | None = None
    consumers: list[Consumer] = field(default_factory=list)

    def state(self) -> dict[str, int]:
        """Plugged and pinned bytes (under the lock), and this process's VmPin."""
        vm_pin = proc_status().vm_pin
        with self.lock:
            return {
                "plugged": sum(d.plugged_size for d in self.devices),
                "pinned": sum(c.pinned_bytes for c in self.consumers),
                "vm_pin": vm_pin,
            }

    def digest(self) -> str:
        from ramdiscard.migration.digest import memory_digest

        with self.lock:
            return str(memory_digest(self.space, self.devices)["sha256"])


def uffd_count() -> int:
    """userfaultfd descriptors open in this process."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += "userfaultfd" in os.readlink(f"/proc/self/fd/{fd}")
    return n


def _params(args: argparse.Namespace) -> PrecopyParams:
    return PrecopyParams(downtime_limit=args.downtime_limit / 1000.0, max_bandwidth=args.max_bandwidth)


def send_live(args: argparse.Namespace, side: Side, timeout: float) -> int:
    """Run the precopy from ``side`` (module rules); the caller closes ``side``."""
    display = LiveDisplay(sys.stderr, tty=sys.stderr.isatty(), quiet=args.quiet)
    before = side.state()
    busy_before = [d.busy_predicate for d in side.devices]
    box: dict[str, Any] = {}
    cancel_asked = threading.Event()

    def started(src: PrecopySource) -> None:
        box["src"] = src
        display.watch(src.stats)
        if cancel_asked.is_set():
            src.cancel.set()

    def work() -> None:
        try:
            box["stats"] = precopy_to(
                args.host, args.port, side.space, side.devices, side.writer, _params(args),
                progress=display.update, timeout=timeout, io_timeout=timeout, on_start=started,
            )  # fmt: skip
        except BaseException as exc:  # re-raised or reported by the main thread
            box["error"] = exc
        finally:
            done.set()

    # An Event, not Thread.join: on 3.11 a KeyboardInterrupt landing inside join() can
    # mark a running thread as stopped.
    done = threading.Event()
    threading.Thread(target=work, name="ramdiscard-precopy", daemon=True).start()
    try:
        while not done.wait(0.1):
            pass
    except KeyboardInterrupt:
        with interrupts.deferred():
            cancel_asked.set()
            src: PrecopySource | None = box.get("src")
            if src is not None:
                src.cancel.set()
                with contextlib.suppress(OSError):
                    src.sock.shutdown(socket.SHUT_RDWR)
            done.wait(CANCEL_WAIT)
            display.close()
            if "stats" not in box:
                return _after_cancel(args, side, before, busy_before, alive=not done.is_set())
    finally:
        display.close()
    if "error" in box:
        raise box["error"]
    st: PrecopyStats = box["stats"]
    _summary(args, "source", st, side.digest())
    return 0


def _after_cancel(
    args: argparse.Namespace,
    side: Side,
    before: dict[str, int],
    busy_before: list[Callable[[], bool] | None],
    *,
    alive: bool,
) -> int:
    after = side.state()
    problems = []
    if alive:
        problems.append(f"the migration did not stop within {CANCEL_WAIT:g} s")
    for key in ("plugged", "pinned"):
        if after[key] != before[key]:
            problems.append(f"{key} {format_size(after[key])}, was {format_size(before[key])}")
    if [d.busy_predicate for d in side.devices] != busy_before:
        problems.append("devices still frozen")
    if uffd_count():
        problems.append("memory still write-protected (userfaultfd open)")
    w = side.writer
    writes = ""
    if w is not None and w.rate:
        start = w.pages_written
        deadline = time.monotonic() + WRITER_WAIT
        while w.pages_written == start and time.monotonic() < deadline:
            time.sleep(0.02)
        if w.pages_written == start or w.paused:
            problems.append("the guest writer does not write")
        writes = f", guest writing ({w.pages_written - start} pages since)"
    row = {"role": "source", "status": "cancelled", "intact": not problems, "problems": problems, **after}
    if args.json:
        print(json.dumps(row))
    elif problems:
        print("migration cancelled; source NOT intact: " + "; ".join(problems))
    else:
        print(
            f"migration cancelled; the source runs on: plugged {format_size(after['plugged'])}, "
            f"pinned {format_size(after['pinned'])} (both as before){writes}, devices unfrozen, "
            "nothing write-protected"
        )
    sys.stdout.flush()
    return 1 if problems else 130


def _summary(args: argparse.Namespace, role: str, st: PrecopyStats, digest: str) -> None:
    row = {
        "role": role, "status": st.status, "total_time": st.total_time, "downtime": st.downtime,
        "setup_time": st.setup_time, "rounds": st.rounds, "round_bytes": st.round_bytes,
        "transferred": st.stream_bytes, "page_bytes": st.page_bytes, "populated": st.total_bytes,
        "fallback": st.fallback, "digest": digest,
    }  # fmt: skip
    if args.json:
        print(json.dumps(row))
        return
    print(
        f"{role}: live migration {st.status}: total {st.total_time:.3f} s, downtime "
        f"{st.downtime * 1000:.1f} ms, transferred {format_size(st.stream_bytes)} "
        f"({format_size(st.page_bytes)} of pages, {format_size(st.total_bytes)} populated), "
        f"{st.rounds} round(s) + switchover ({', '.join(format_size(b) for b in st.round_bytes)}), "
        f"digest {digest[:16]}" + (f", fallback: {st.fallback}" if st.fallback else "")
    )


def receive_live_cli(
    args: argparse.Namespace, side: Side, ls: socket.socket, extra: Callable[[], dict[str, object]]
) -> dict[str, object]:
    """Load one live stream into ``side`` from ``ls``; print the round lines (unless
    quiet) and the summary. Returns the summary row (``extra()`` merged in)."""
    from ramdiscard.migration.live_load import receive_live
    from ramdiscard.migration.transport import IO_TIMEOUT

    quiet = args.quiet

    def on_round(n: int) -> None:
        if not quiet:
            print(f"received round {n}", file=sys.stderr, flush=True)

    stats = receive_live(
        ls, side.space, side.devices, accept_timeout=args.timeout,
        read_timeout=args.timeout or IO_TIMEOUT, on_round=on_round,
    )  # fmt: skip
    more = extra()
    state = side.state()
    digest = side.digest()
    row: dict[str, object] = {
        "role": "destination", "status": "completed", "rounds": stats.rounds, "page_bytes": stats.page_bytes,
        "transferred": stats.stream_bytes, "seconds": stats.seconds, **state, "digest": digest, **more,
    }  # fmt: skip
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"destination: live migration completed: {stats.rounds} round(s), "
            f"{format_size(stats.page_bytes)} of pages ({format_size(stats.stream_bytes)} streamed) "
            f"in {stats.seconds:.3f} s, plugged {format_size(state['plugged'])}, "
            f"pinned {format_size(state['pinned'])}, VmPin {format_size(state['vm_pin'])}, "
            f"digest {digest[:16]}" + "".join(f", {k} {v}" for k, v in more.items())
        )
    return row


def add_live_options(p: argparse.ArgumentParser, sender: bool, size: Callable[[str], int]) -> None:
    """The ``--live`` options of ``send`` (``sender``) or ``receive``."""
    p.add_argument(
        "--live",
        action="store_true",
        help="live precopy: the guest keeps writing while memory is sent (progress on stderr)"
        if sender
        else "load a live precopy stream (the sender's --live); print the memory digest",
    )
    if not sender:
        return
    p.add_argument(
        "--downtime-limit",
        type=int,
        default=DOWNTIME_LIMIT,
        metavar="MS",
        help=f"--live: longest guest pause at the switchover, ms (QMP downtime-limit; {DOWNTIME_LIMIT})",
    )
    p.add_argument(
        "--max-bandwidth",
        type=size,
        default=0,
        metavar="SIZE",
        help="--live: bytes per second during the live rounds, e.g. 100M (QMP max-bandwidth; 0: unlimited)",
    )
    p.add_argument(
        "--write-rate",
        type=size,
        default=None,
        metavar="SIZE",
        help="--live, demo guest: bytes per second the guest writes while it migrates (0)",
    )
    p.add_argument(
        "--write-pattern",
        choices=["random", "hot", "sequential"],
        default="random",
        help="--live, demo guest: which 4 KiB pages the writer picks (random)",
    )


def check_live_args(args: argparse.Namespace) -> str | None:
    """A one-line problem with the ``--live`` options of ``send``, or None."""
    if not 0 <= args.downtime_limit <= 2_000_000:
        return f"--downtime-limit must be in [0, 2000000] ms, got {args.downtime_limit}"
    if not args.live:
        given = [
            o
            for o, v in (
                ("--downtime-limit", args.downtime_limit != DOWNTIME_LIMIT),
                ("--max-bandwidth", args.max_bandwidth != 0),
                ("--write-rate", args.write_rate is not None),
            )
            if v
        ]
        if given:
            return f"{given[0]} needs --live"
    if args.scenario is not None and args.write_rate is not None:
        return "--write-rate is for the demo guest; a scenario's writer is its [workload] write-rate"
    return None


__all__: Sequence[str] = (
    "LiveDisplay", "Side", "add_live_options", "check_live_args", "progress_line", "receive_live_cli",
    "send_live", "uffd_count",
)  # fmt: skip
