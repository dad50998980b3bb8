"""Postcopy, the destination side: a precopy, then the guest runs while the rest arrives.

Rules (live-migration.md; wire in :mod:`ramdiscard.migration.postcopy_wire`):

* :func:`receive_postcopy` takes the accepted main channel (preamble already read) and
  the listening socket (the priority channel connects there at the switchover). Phase 1
  loads the source's precopy exactly as :func:`~ramdiscard.migration.live_load.load_live`
  does (checked metadata first: a refusal changes nothing; only plugged runs populated;
  read positions acknowledged), and refuses at once a region that is not 4 KiB-paged
  host RAM. A stream that ends without a switchover is a completed precopy: the states
  are loaded, the source told ``OK``, :attr:`PostcopyDestStats.switched` is False (the
  caller starts the guest as after a precopy). A failure in phase 1 resets the
  destination to all discarded and tells the source.
* The switchover names per region the runs still to come; each must lie in the final
  plugged runs, and every other plugged byte must have been received (else refused,
  reset, the source told). The priority channel must say hello.
* Phase 2, in this order, the guest not running: the pinning consumers (``pins``: a DMA
  pin would fault in every missing page and hold the guest until all memory arrived;
  QEMU refuses postcopy with VFIO for that reason) are detached; every region is
  registered with a userfaultfd (MISSING) opened here; then this process drops
  (``discard_range``: MADV_DONTNEED, or a hole punched in a memfd) everything of the
  region but the kept runs (received and not named: pages the source wrote after
  sending them are dropped, so they fault and arrive again); only then does the fault
  handler process (:mod:`ramdiscard.migration.postcopy_faults`, which cannot drop pages
  in this process) get the fd, both channels and the kept runs; the devices load their
  states with ``incoming_postcopy`` (unplugged ranges are not discarded again, nothing is
  preallocated), and ``on_running`` starts the guest. A guest touch of a dropped or
  never-received plugged page faults and is requested; discarded memory is never
  populated by the migration: a touch there gets a zero page from the handler, never a
  request to the source.
* The devices answer BUSY from the start until the end (success or failure).
* Completion: the handler reports every plugged page placed. The regions are
  unregistered, the unplugged ranges discarded (what zero pages a stray touch left),
  the pinning consumers attached again (they pin the plugged memory, now all present),
  and the source is told ``OK``; only then does it drop its copy.
* Failure after the guest started (source gone, channel silent for ``io_timeout``,
  malformed message, handler error): unrecoverable for this side, as in QEMU. The
  handler is ended, the regions unregistered (a waiting guest access returns), then
  ``on_failure`` stops the guest for good, the destination is reset to all discarded
  and the pinning consumers attached again; the source is told the reason (if it can
  still hear it) and keeps its own copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ramdiscard.hostmem import uffd_missing as um
from ramdiscard.migration import postcopy_wire as w
from ramdiscard.migration.busy import Freeze, frozen
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.postcopy_faults import spawn
from ramdiscard.migration.runs import Coverage, Runs, subtract
from ramdiscard.migration.stream import MigrationError, StreamError
from ramdiscard.migration.transport import IO_TIMEOUT, SocketReader, send_status

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem


class Pins(Protocol):
    """A consumer that pins guest memory: detached while pages arrive."""

    def detach(self) -> None: ...

    def attach(self) -> None: ...


@dataclass
class PostcopyDestStats:
    faults: int = 0
    """Guest faults on plugged pages not placed yet (each was requested or waited for one)."""
    zero_faults: int = 0
    """Faults in unplugged memory, resolved with a local zero page."""
    requests: int = 0
    background_bytes: int = 0
    priority_bytes: int = 0
    latencies: list[float] = field(default_factory=list)
    """Seconds from each fault's message to its page placed."""
    switchover_time: float = 0.0
    """Seconds from the connection to the guest running."""
    seconds: float = 0.0
    switched: bool = True
    """False: the precopy converged, nothing was left for a postcopy."""
    rounds: int = 0
    precopy_bytes: int = 0
    """Page bytes received during the precopy rounds."""
    kept_bytes: int = 0
    """Plugged bytes kept at the switchover (received, not written since)."""
    needed_bytes: int = 0
    """Plugged bytes still to come at the switchover."""
    dropped_bytes: int = 0
    """Of those, bytes received during the rounds and dropped (written since sent)."""


def receive_postcopy(
    conn: socket.socket,
    listen_socket: socket.socket,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    *,
    io_timeout: float = IO_TIMEOUT,
    pins: Sequence[Pins] = (),
    on_running: Callable[[], None] | None = None,
    on_failure: Callable[[], None] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> PostcopyDestStats:
    """Receive a postcopy on ``conn`` (module rules). Raises MigrationError."""
    from ramdiscard.migration.destination import commit_states, reset_to_discarded
    from ramdiscard.migration.live_load import Acker, CountingReader, LiveLoad
    from ramdiscard.migration.tcp import drain_peer, tune_socket

    t0 = time.perf_counter()
    stats = PostcopyDestStats()
    prio: socket.socket | None = None
    kept: list[Runs] = []
    try:
        with frozen(devices) as freeze:
            regions = collect_regions(address_space, devices)
            requested = {dev.id: dev.requested_size for dev in devices}
            changed = False
            try:
                conn.settimeout(io_timeout)
                tune_socket(conn)
                reader = CountingReader(conn)
                acker = Acker(conn, reader)
                try:
                    load = LiveLoad(regions, devices, reader, on_round=on_round, postcopy=True)
                    load.start()
                    for r in regions:
                        if r.page_size != w.PAGE or r.mr.ram is None:
                            raise MigrationError(
                                f"postcopy: region {r.mr.name!r} is not 4 KiB-paged host RAM"
                            )
                    changed = True
                    load.run()
                finally:
                    acker.close()
                stats.rounds, stats.precopy_bytes = load.stats.rounds, load.stats.page_bytes
                if not load.handover:
                    load.check_complete()
                    commit_states(load.managed, load.final_images())
                    stats.switched = False
                else:
                    kept = load.present()
                    listen_socket.settimeout(io_timeout)
                    prio, _peer = listen_socket.accept()
                    prio.settimeout(io_timeout)
                    hello = bytearray(len(w.PRIORITY_HELLO))
                    SocketReader(prio).read_exact(memoryview(hello))
                    if hello != w.PRIORITY_HELLO:
                        raise StreamError("postcopy: the priority channel did not say hello")
                    prio.settimeout(None)
                    prio.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except Exception as exc:
                if changed:
                    reset_to_discarded(regions, requested, freeze)
                _tell(conn, exc)
                with contextlib.suppress(OSError):
                    drain_peer(conn)
                if not changed:
                    raise MigrationError(f"postcopy refused (nothing changed): {exc}") from exc
                raise MigrationError(f"migration failed, destination reset to all discarded: {exc}") from exc
            if stats.switched:
                assert prio is not None
                ph = _Phase2(conn, prio, regions, load.final, stats, io_timeout)
                ph.run(kept, load.handover, load.cover, pins, on_running, on_failure, t0, requested, freeze)
        send_status(conn, None)
    finally:
        if prio is not None:
            prio.close()
    stats.seconds = time.perf_counter() - t0
    return stats


class _Phase2:
    """The postcopy proper, after a checked switchover (module rules, phase 2)."""

    def __init__(
        self,
        conn: socket.socket,
        prio: socket.socket,
        regions: list[RamRegion],
        images: dict[int, bytes],
        stats: PostcopyDestStats,
        io_timeout: float,
    ) -> None:
        self.conn, self.prio, self.regions, self.images = conn, prio, regions, images
        self.stats, self.io_timeout = stats, io_timeout

    def run(
        self,
        kept: list[Runs],
        needed: dict[int, Runs],
        cover: list[Coverage],
        pins: Sequence[Pins],
        on_running: Callable[[], None] | None,
        on_failure: Callable[[], None] | None,
        t0: float,
        requested: dict[str, int],
        freeze: Freeze,
    ) -> None:
        from ramdiscard.migration.destination import reset_to_discarded

        regions, stats = self.regions, self.stats
        managed = [r for r in regions if r.device is not None]
        for r, keep, cov in zip(regions, kept, cover, strict=True):
            want = needed.get(r.index, [])
            stats.kept_bytes += sum(n for _s, n in keep)
            stats.needed_bytes += sum(n for _s, n in want)
            stats.dropped_bytes += sum(n for _s, n in want) - sum(n for _s, n in subtract(want, cov.runs()))
        proc: subprocess.Popen[bytes] | None = None
        ctl: socket.socket | None = None
        fd = um.open_missing()
        registered: list[tuple[int, int]] = []
        detached: list[Pins] = []
        running = False
        try:
            for p in pins:  # before anything is dropped: a pin holds its pages
                p.detach()
                detached.append(p)
            for r in regions:
                um.register_missing(fd, r.mr.ram.host_address, r.size)  # type: ignore[union-attr]
                registered.append((r.mr.ram.host_address, r.size))  # type: ignore[union-attr]
            for r, keep in zip(regions, kept, strict=True):  # registered first: a dropped page faults
                for s, n in subtract([(0, r.size)], keep):
                    r.mr.ram.discard_range(s, n)  # type: ignore[union-attr]
            plugged = [_plugged(r, self.images) for r in regions]
            proc, ctl = spawn(fd, self.conn, self.prio)
            cfg = {
                "addrs": [a for a, _n in registered], "sizes": [r.size for r in regions],
                "plugged": plugged, "present": kept, "io_timeout": self.io_timeout, "window": 64 * 1024,
            }  # fmt: skip
            ctl.sendall(json.dumps(cfg).encode() + b"\n")
            for r in managed:
                assert r.device is not None
                try:
                    r.device.restore(self.images[r.index], incoming_postcopy=True)
                except Exception as exc:
                    raise MigrationError(f"device {r.device.id!r}: {exc}") from exc
            stats.switchover_time = time.perf_counter() - t0
            running = True
            if on_running is not None:
                on_running()
            _collect(ctl, proc, stats)
            _unregister(fd, registered)
            for r in managed:
                for s, n in r.discarded_runs():
                    r.mr.ram.discard_range(s, n)  # type: ignore[union-attr]
            for p in reversed(detached):
                p.attach()
            detached.clear()
        except BaseException as exc:
            _end(proc, ctl, kill=True)
            _unregister(fd, registered)
            if running and on_failure is not None:
                on_failure()
            reset_to_discarded(regions, requested, freeze)
            for p in reversed(detached):
                with contextlib.suppress(Exception):
                    p.attach()
            _tell(self.conn, exc)
            if isinstance(exc, MigrationError):
                raise
            if isinstance(exc, Exception):
                why = f"postcopy failed, destination reset to all discarded: {exc!r}"
                raise MigrationError(why) from exc
            raise
        finally:
            os.close(fd)
            _end(proc, ctl)


def _plugged(region: Any, images: dict[int, bytes]) -> list[tuple[int, int]]:
    if region.device is None:
        return [(0, region.size)]
    from ramdiscard.migration.destination import plugged_runs
    from ramdiscard.providers.virtio_mem.persist import decode_state

    image = decode_state(images[region.index])
    return plugged_runs(image.bitmap, image.nb_blocks, image.block_size)


def _collect(ctl: socket.socket, proc: subprocess.Popen[bytes], stats: PostcopyDestStats) -> None:
    """Wait for the handler's verdict; fill ``stats`` or raise MigrationError."""
    buf = b""
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    while b"\n" not in buf:
        if not poller.poll(200):
            if proc.poll() is not None:
                raise MigrationError(f"postcopy: the fault handler exited ({proc.returncode})")
            continue
        data = ctl.recv(65536)
        if not data:
            raise MigrationError("postcopy: the fault handler closed its control socket")
        buf += data
    msg = json.loads(buf.split(b"\n", 1)[0])
    if msg.get("event") != "done":
        raise MigrationError(str(msg.get("message", "postcopy: the fault handler failed"))[:512])
    for key in ("faults", "zero_faults", "requests", "background_bytes", "priority_bytes", "latencies"):
        setattr(stats, key, msg[key])


def _unregister(fd: int, registered: list[tuple[int, int]]) -> None:
    for addr, length in registered:
        with contextlib.suppress(OSError):
            um.unregister(fd, addr, length)
    registered.clear()


def _end(proc: subprocess.Popen[bytes] | None, ctl: socket.socket | None, kill: bool = False) -> None:
    if ctl is not None:
        with contextlib.suppress(OSError):
            ctl.close()
    if proc is not None and proc.poll() is None:
        if kill:
            proc.kill()
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tell(conn: socket.socket, exc: BaseException) -> None:
    with contextlib.suppress(OSError):
        send_status(conn, str(exc) or type(exc).__name__)
