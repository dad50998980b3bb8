"""Postcopy, the destination side: the guest runs while its memory arrives.

Rules (live-migration.md; wire in :mod:`ramdiscard.migration.postcopy_wire`):

* :func:`receive_postcopy` takes the accepted main channel (preamble already read) and
  the listening socket (the priority channel connects there next). The switchover
  may come any time later (``migrate-start-postcopy``); the source closing the
  connection meanwhile ends the wait. Phase 1 changes
  nothing: the REGION table and DEVICE states are read and checked as for any stream
  (:class:`~ramdiscard.migration.destination.Incoming`), then the priority channel must
  say hello; a refusal raises :class:`MigrationError` and the source is told.
* Phase 2: every region is emptied (its old content is replaced) and registered with a
  userfaultfd (MISSING) opened here; the fault handler process
  (:mod:`ramdiscard.migration.postcopy_faults`) gets the fd and both channels. The
  pinning consumers (``pins``: a DMA pin would fault in every missing page and hold the
  guest until all memory arrived; QEMU refuses postcopy with VFIO for that reason) are
  detached, the devices load their states with ``incoming_postcopy`` (unplugged ranges
  are not discarded again, nothing is preallocated), and ``on_running`` starts the guest.
  Discarded memory is never populated by the migration: a guest touch there gets a
  zero page from the handler, never a request to the source.
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
from ramdiscard.migration.busy import frozen
from ramdiscard.migration.layout import collect_regions
from ramdiscard.migration.postcopy_faults import spawn
from ramdiscard.migration.stream import End, MigrationError, StreamError
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
) -> PostcopyDestStats:
    """Receive a postcopy on ``conn`` (module rules). Raises MigrationError."""
    t0 = time.perf_counter()
    stats = PostcopyDestStats()
    prio: socket.socket | None = None
    proc: subprocess.Popen[bytes] | None = None
    ctl: socket.socket | None = None
    try:
        with frozen(devices) as freeze:
            regions = collect_regions(address_space, devices)
            try:
                conn.settimeout(None)  # the source switches over when its user says so
                conn.recv(1, socket.MSG_PEEK)
                conn.settimeout(io_timeout)
                images = _read_switchover(regions, conn)
                listen_socket.settimeout(io_timeout)
                prio, _peer = listen_socket.accept()
                prio.settimeout(io_timeout)
                hello = bytearray(len(w.PRIORITY_HELLO))
                SocketReader(prio).read_exact(memoryview(hello))
                if hello != w.PRIORITY_HELLO:
                    raise StreamError("postcopy: the priority channel did not say hello")
                prio.settimeout(None)
                prio.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for r in regions:
                    if r.page_size != w.PAGE or r.mr.ram is None:
                        raise MigrationError(f"postcopy: region {r.mr.name!r} is not 4 KiB-paged host RAM")
            except (OSError, MigrationError) as exc:
                _tell(conn, exc)
                raise MigrationError(f"postcopy refused (nothing changed): {exc}") from exc
            managed = [r for r in regions if r.device is not None]
            requested = {dev.id: dev.requested_size for dev in devices}
            fd = um.open_missing()
            registered: list[tuple[int, int]] = []
            detached: list[Pins] = []
            running = False
            try:
                for p in pins:  # before the regions are emptied: a pin holds its pages
                    p.detach()
                    detached.append(p)
                for r in regions:
                    r.mr.ram.discard_range(0, r.size)  # type: ignore[union-attr]
                    um.register_missing(fd, r.mr.ram.host_address, r.size)  # type: ignore[union-attr]
                    registered.append((r.mr.ram.host_address, r.size))  # type: ignore[union-attr]
                plugged = [_plugged(r, images) for r in regions]
                proc, ctl = spawn(fd, conn, prio)
                cfg = {
                    "addrs": [a for a, _n in registered], "sizes": [r.size for r in regions],
                    "plugged": plugged, "io_timeout": io_timeout, "window": 64 * 1024,
                }  # fmt: skip
                ctl.sendall(json.dumps(cfg).encode() + b"\n")
                for r in managed:
                    assert r.device is not None
                    try:
                        r.device.restore(images[r.index], incoming_postcopy=True)
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
                from ramdiscard.migration.destination import reset_to_discarded

                reset_to_discarded(regions, requested, freeze)
                for p in reversed(detached):
                    with contextlib.suppress(Exception):
                        p.attach()
                _tell(conn, exc)
                if isinstance(exc, MigrationError):
                    raise
                if isinstance(exc, Exception):
                    why = f"postcopy failed, destination reset to all discarded: {exc!r}"
                    raise MigrationError(why) from exc
                raise
            finally:
                os.close(fd)
        send_status(conn, None)
    finally:
        _end(proc, ctl)
        if prio is not None:
            prio.close()
    stats.seconds = time.perf_counter() - t0
    return stats


def _read_switchover(regions: list[Any], conn: socket.socket) -> dict[int, bytes]:
    """The checked device states of the switchover stream, by region index."""
    from ramdiscard.migration.destination import Incoming
    from ramdiscard.migration.progress import ProgressTracker

    inc = Incoming(regions, SocketReader(conn), None, ProgressTracker("receive", 0, None))
    images, event = inc.read_metadata()
    if not isinstance(event, End):
        raise StreamError(f"postcopy: {type(event).__name__} after the device states (END expected)")
    managed = [r for r in regions if r.device is not None]
    return {r.index: img for r, img in zip(managed, images, strict=True)}


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
