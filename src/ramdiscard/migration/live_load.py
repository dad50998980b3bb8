"""Live migration, the destination side: loading a precopy stream while it arrives.

Rules (format in ``docs/migration-format.md``):

* Receiving (:func:`load_live`): the stream is checked as a stop-and-copy one is, with
  these differences: page sections may repeat; a later DEVICE state replaces the
  earlier one (its plugged runs bound what may arrive next; ranges that left it are
  discarded here at once); at END every plugged run of the final state must have been
  received. Nothing outside plugged runs is ever populated; a failure resets the
  destination to all discarded, as :func:`ramdiscard.migration.load` does.
* The destination acknowledges its read position to the source (``AK`` + u64, at most
  every :data:`~ramdiscard.migration.returnpath.ACK_INTERVAL` s while data arrives) ahead of
  its final status, so the source can tell a stalled destination from full socket buffers.
"""

from __future__ import annotations

import socket
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ramdiscard.migration.busy import frozen
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.stream import (
    DeviceState,
    End,
    Handover,
    MigrationError,
    PageData,
    PageList,
    Round,
    StreamError,
)
from ramdiscard.migration.transport import (
    IO_TIMEOUT,
    ReadTimeout,
    SocketReader,
    send_status,
)

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

from ramdiscard.migration.returnpath import ACK_INTERVAL, RETURN_MSG, RETURN_POS
from ramdiscard.migration.runs import Coverage, subtract
from ramdiscard.migration.tracking import PAGE


@dataclass
class LiveLoadStats:
    rounds: int = 0
    page_bytes: int = 0
    stream_bytes: int = 0
    seconds: float = 0.0


def load_live(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    reader: SocketReader,
    *,
    on_round: Callable[[int], None] | None = None,
) -> LiveLoadStats:
    """Load a live (or stop-and-copy) stream from ``reader`` (module rules). Raises
    MigrationError with the destination reset to all discarded."""
    from ramdiscard.migration.destination import commit_states, reset_to_discarded

    t0 = time.perf_counter()
    with frozen(devices) as freeze:
        regions = collect_regions(address_space, devices)
        requested = {dev.id: dev.requested_size for dev in devices}
        load = LiveLoad(regions, devices, reader, on_round=on_round)
        try:
            load.start()
        except OSError as exc:
            raise MigrationError(f"reading the stream failed (nothing changed): {exc}") from exc
        try:
            load.run()
            load.check_complete()
            commit_states(load.managed, load.final_images())
        except BaseException as exc:
            reset_to_discarded(regions, requested, freeze)
            if isinstance(exc, MigrationError):
                raise
            if isinstance(exc, Exception):
                raise MigrationError(f"restore failed, destination reset to all discarded: {exc!r}") from exc
            raise
    load.stats.stream_bytes = load.inc.position
    load.stats.seconds = time.perf_counter() - t0
    return load.stats


class LiveLoad:
    """One live stream being loaded (module rules): :meth:`start` reads and checks the
    metadata (nothing changes; raises MigrationError), :meth:`run` the rest up to END,
    populating only plugged runs (raises StreamError; the caller resets). With
    ``postcopy`` the stream may end with the switchover: :attr:`handover` then holds,
    per region, the runs still to come, each checked to lie in the final plugged runs."""

    def __init__(
        self,
        regions: list[RamRegion],
        devices: Sequence[VirtioMem],
        reader: SocketReader,
        *,
        on_round: Callable[[int], None] | None = None,
        postcopy: bool = False,
    ) -> None:
        from ramdiscard.migration.decoder import Decoder
        from ramdiscard.migration.destination import Incoming, stream_limits
        from ramdiscard.migration.progress import ProgressTracker

        for dev in devices:
            if dev.plugged_size:
                raise MigrationError(f"device {dev.id!r} has memory plugged; a destination must start empty")
        self.regions = regions
        self.managed = [r for r in regions if r.device is not None]
        self.inc = Incoming(regions, reader, None, ProgressTracker("receive", 0, None))
        self.inc.decoder = Decoder(limits=stream_limits(regions), live_ok=True, postcopy_ok=postcopy)
        self.on_round = on_round
        self.stats = LiveLoadStats()
        self.cover = [Coverage() for _r in regions]
        self.final: dict[int, bytes] = {}
        self.handover: dict[int, list[tuple[int, int]]] = {}
        self._event: object = None

    def start(self) -> None:
        images, self._event = self.inc.read_metadata()
        self.final = {r.index: img for r, img in zip(self.managed, images, strict=True)}
        self.inc.prepare_pages(images)
        self._limit_handover()

    def final_images(self) -> list[bytes]:
        return [self.final[r.index] for r in self.managed]

    def _limit_handover(self) -> None:
        self.inc.decoder.max_handover_runs = max(
            (sum(n for _s, n in runs) // PAGE for runs in self.inc.runs), default=0
        )

    def run(self) -> End:
        from ramdiscard.migration.destination import check_state, plugged_runs
        from ramdiscard.providers.virtio_mem.persist import decode_state

        inc, regions, cover, stats = self.inc, self.regions, self.cover, self.stats
        event = self._event
        while not isinstance(event, End):
            if isinstance(event, PageData):
                end = event.offset + event.length
                inc.receive_page(event, populated=cover[event.region].covers(event.offset, end))
                cover[event.region].add(event.offset, end)
                stats.page_bytes += event.length
            elif isinstance(event, PageList):
                _receive_list(inc, regions, cover[event.region], event)
                stats.page_bytes += len(event.data)
            elif isinstance(event, Round):
                stats.rounds = event.number
                if self.on_round is not None:
                    self.on_round(event.number)
            elif isinstance(event, DeviceState):
                region = regions[event.region]
                if region.device is None:
                    raise StreamError(f"DEVICE section for unmanaged region {region.mr.name!r}")
                check_state(region.device, event.state)
                image = decode_state(event.state)
                runs = plugged_runs(image.bitmap, image.nb_blocks, image.block_size)
                for s, n in subtract(inc.runs[event.region], runs):
                    region.mr.ram.discard_range(s, n)  # type: ignore[union-attr]
                    cover[event.region].remove(s, s + n)
                inc.runs[event.region] = runs
                inc.starts[event.region] = [s for s, _n in runs]
                self.final[event.region] = event.state
                self._limit_handover()
            elif isinstance(event, Handover):
                runs = list(event.runs)
                if subtract(runs, inc.runs[event.region]):
                    raise StreamError(
                        f"postcopy switchover: region {regions[event.region].mr.name!r} names runs "
                        "outside its plugged memory"
                    )
                self.handover[event.region] = runs
            else:
                raise StreamError(f"unexpected {type(event).__name__} in a live stream")
            event = inc.next_event()
        self.stats.stream_bytes = inc.position
        return event

    def check_complete(self) -> None:
        """Every plugged run received (what a precopy's END promises)."""
        for region, runs, cov in zip(self.regions, self.inc.runs, self.cover, strict=True):
            for s, n in runs:
                if not cov.covers(s, s + n):
                    raise StreamError(
                        f"region {region.mr.name!r}: plugged range [{s:#x}, +{n:#x}) was not received"
                    )

    def present(self) -> list[list[tuple[int, int]]]:
        """After a switchover: per region, the plugged runs the destination keeps (every
        byte received, none named by the switchover). Raises StreamError when a kept
        byte never arrived."""
        out = []
        for region, runs, cov in zip(self.regions, self.inc.runs, self.cover, strict=True):
            keep = subtract(runs, self.handover.get(region.index, []))
            for s, n in keep:
                if not cov.covers(s, s + n):
                    raise StreamError(
                        f"postcopy switchover: region {region.mr.name!r}: [{s:#x}, +{n:#x}) was "
                        "neither received nor named as still to come"
                    )
            out.append(keep)
        return out


def _receive_list(inc: _IncomingLike, regions: list[RamRegion], cover: Coverage, event: PageList) -> None:
    """Check every page of ``event`` against the plugged runs, populate the ones not
    received before, then copy the data to guest memory (checksum already verified)."""
    region = regions[event.region]
    runs, starts = inc.runs[event.region], inc.starts[event.region]
    for off in event.offsets:
        i = bisect_right(starts, off) - 1
        if i < 0 or off + PAGE > runs[i][0] + runs[i][1]:
            raise StreamError(
                f"page list entry {off:#x} of region {region.mr.name!r} is not inside a plugged range"
            )
    fresh = [off for off in event.offsets if not cover.covers(off, off + PAGE)]
    if region.device is not None:
        for off in fresh:
            region.mr.ram.populate(off, PAGE)  # type: ignore[union-attr]
    pages = np.frombuffer(inc.view(event.region), dtype=np.uint8).reshape(-1, PAGE)
    idx = np.fromiter(event.offsets, dtype=np.int64, count=len(event.offsets)) // PAGE
    pages[idx] = np.frombuffer(event.data, dtype=np.uint8).reshape(-1, PAGE)
    for off in fresh:
        cover.add(off, off + PAGE)
    inc.received[event.region] += len(event.data)


class _IncomingLike(Protocol):
    runs: list[list[tuple[int, int]]]
    starts: list[list[int]]
    received: list[int]

    def view(self, index: int) -> memoryview: ...


def receive_live(
    listen_socket: socket.socket,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    *,
    accept_timeout: float | None = None,
    read_timeout: float = IO_TIMEOUT,
    on_round: Callable[[int], None] | None = None,
    on_connection: Callable[[socket.socket], None] | None = None,
) -> LiveLoadStats:
    """Accept one source on ``listen_socket`` and load its stream (live or not); the
    source is told the outcome. ``read_timeout`` bounds every silence of the source.
    Raises MigrationError (destination reset), TimeoutError when nobody connected."""
    listen_socket.settimeout(accept_timeout)
    conn, _peer = listen_socket.accept()
    with conn:
        if on_connection is not None:
            on_connection(conn)
        return serve_live(conn, address_space, devices, read_timeout=read_timeout, on_round=on_round)


def serve_live(
    conn: socket.socket,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    *,
    read_timeout: float = IO_TIMEOUT,
    on_round: Callable[[int], None] | None = None,
    prefix: bytes = b"",
) -> LiveLoadStats:
    """:func:`receive_live` on an accepted connection; ``prefix``: the stream's first
    bytes, already read from ``conn``."""
    from ramdiscard.migration.tcp import drain_peer, tune_socket

    conn.settimeout(read_timeout)
    tune_socket(conn)
    reader = CountingReader(conn, prefix)
    acker = Acker(conn, reader)
    try:
        stats = load_live(address_space, devices, reader, on_round=on_round)
    except Exception as exc:
        acker.close()
        try:
            send_status(conn, str(exc) or type(exc).__name__)
            if not isinstance(exc, ReadTimeout):
                drain_peer(conn)
        except OSError:
            pass
        raise
    acker.close()
    send_status(conn, None)
    return stats


class CountingReader(SocketReader):
    """A SocketReader that counts what it has read (the acknowledged position)."""

    def __init__(self, sock: socket.socket, prefix: bytes = b"") -> None:
        super().__init__(sock)
        self.position = 0
        self._prefix = prefix

    def read_exact(self, view: memoryview, on_data: Callable[[int, int], None] | None = None) -> None:
        if self._prefix:  # bytes read before this reader existed come first
            k = min(len(self._prefix), view.nbytes)
            view[:k] = self._prefix[:k]
            self._prefix = self._prefix[k:]
            self.position += k
            if on_data is not None:
                on_data(0, k)
                inner = on_data
                on_data = lambda offset, length: inner(offset + k, length)  # noqa: E731
            view = view[k:]
            if not view.nbytes:
                return
        if on_data is None:
            super().read_exact(view)
        else:

            def landed(offset: int, length: int) -> None:
                self.position += length
                on_data(offset, length)

            super().read_exact(view, landed)
            return
        self.position += view.nbytes


class Acker:
    """Acknowledges the reader's position every :data:`ACK_INTERVAL` s while it moves
    (a thread of its own: the acks go out whatever the loader is doing). :meth:`close`
    stops it before the status is sent, so the two never interleave."""

    def __init__(self, sock: socket.socket, reader: CountingReader) -> None:
        self.sock = sock
        self.reader = reader
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ramdiscard-migrate-ack", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = 0
        while not self._stop.wait(ACK_INTERVAL):
            pos = self.reader.position
            if pos == last:
                continue
            try:
                self.sock.sendall(RETURN_MSG.pack(b"AK", RETURN_POS.size) + RETURN_POS.pack(pos))
            except OSError:
                return
            last = pos

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
