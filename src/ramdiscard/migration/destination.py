"""The migration destination: validate, then restore RAM and virtio-mem state.

Rules (qemu-ram-discard §3.10, §4.2):

* The destination starts empty: every device has nothing plugged (otherwise refused
  before anything changes). Its devices are frozen (busy) until the load ends.
* Phase 1, nothing changes: the stream header, the whole REGION table and every DEVICE
  state are read and checked: same regions (count, order, names, sizes, page sizes,
  kinds, device ids), state images that decode (magic, version, checksum, bitmap size)
  and whose sanity block (addr, region size, block size, node) matches the local device.
  Any failure raises :class:`MigrationError` and the destination is untouched.
* Phase 2, receive: page sections are written straight into guest memory. A page section
  must lie inside the region, be 4 KiB aligned, come in order and, for a managed region,
  lie inside a run the stream's device state marks plugged; that is checked from its
  header *before* any byte is written, so memory outside plugged blocks is never touched.
  The target range of a managed region is populated (``ram.populate``, a clean error
  where memory cannot be had) only right before its data is read, so the destination
  never holds more memory than the data that arrived plus its unmanaged RAM, whatever
  the stream announces. Data is checksummed piece by piece as it lands (while still in
  the CPU cache) and the checksum compared when the section is complete.
* Phase 3, apply: once END has been checked, each device loads its state
  (``load_state``: unplugged memory is discarded, memslots mapped, populate replayed to
  its RamDiscardListeners, so a vfio container pins exactly the plugged memory, and only
  after all of it arrived).
* END must match what was received, and every plugged run (every byte of an unmanaged
  region) must have been received exactly once. Afterwards every unplugged range is
  discarded again ("discarded means discarded").
* **Guarantee on failure in phase 2** (corrupt or truncated data, a listener refusing the
  restored memory, a host error): the destination is reset to *all discarded*: each
  device gets back its original requested size and is unplugged completely (memory
  discarded, listeners told, memslots unmapped), every region is discarded (read as
  zero). That is the state a fresh destination had, so a retry can start at once.
"""

from __future__ import annotations

import io
import logging
import time
from bisect import bisect_right
from collections.abc import Sequence
from typing import TYPE_CHECKING, BinaryIO

from ramdiscard.interfaces import DiscardableMemory
from ramdiscard.migration.busy import Freeze, frozen
from ramdiscard.migration.checksum import address, digest
from ramdiscard.migration.decoder import Decoder
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.progress import ProgressFn, ProgressTracker
from ramdiscard.migration.source import MigrationStats
from ramdiscard.migration.stream import (
    DeviceState,
    End,
    Limits,
    MigrationError,
    PageData,
    RegionInfo,
    StreamError,
    StreamHeader,
    quote,
)
from ramdiscard.migration.transport import FileReader, PositionalFile, Reader

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

log = logging.getLogger("ramdiscard.migration")

_ALIGN = 4096
_READ_PIECE = 1 << 20
"""Metadata payloads are read in pieces of this size: memory grows with what arrived."""


class Incoming:
    """One load in progress: the local regions, the decoder, what was received."""

    def __init__(
        self,
        regions: list[RamRegion],
        reader: Reader,
        pfile: PositionalFile | None,
        tracker: ProgressTracker,
    ) -> None:
        self.regions = regions
        self.reader = reader
        self.pfile = pfile
        self.tracker = tracker
        self.decoder = Decoder(sparse_ok=pfile is not None, limits=stream_limits(regions))
        self.position = 0
        self.runs: list[list[tuple[int, int]]] = []
        self.starts: list[list[int]] = []
        self.received = [0] * len(regions)
        self._views: list[memoryview | None] = [None] * len(regions)

    def view(self, index: int) -> memoryview:
        """Region ``index``'s host memory (looked up once: this runs for every page)."""
        v = self._views[index]
        if v is None:
            v = self._views[index] = self.regions[index].view
        return v

    def next_event(self) -> object:
        """Read until the decoder produces an event (section headers produce none)."""
        while True:
            need = self.decoder.need()
            if need == 0:
                raise StreamError("stream continues after END")
            buf = bytearray(min(need, _READ_PIECE))
            self.reader.read_exact(memoryview(buf))
            while len(buf) < need:
                piece = bytearray(min(need - len(buf), _READ_PIECE))
                self.reader.read_exact(memoryview(piece))
                buf += piece
            self.position += need
            self.tracker.stream(need)
            event = self.decoder.feed(buf)
            if event is not None:
                return event

    # -- phase 1 -------------------------------------------------------------------------

    def read_metadata(self) -> tuple[list[bytes], object]:
        """Header, REGION table and DEVICE states, all checked; returns the device state
        images by region index order and the first event after them."""
        header = self.next_event()
        if not isinstance(header, StreamHeader):
            raise StreamError("stream does not start with a stream header")
        infos: list[RegionInfo] = []
        states: dict[int, bytes] = {}
        event = self.next_event()
        while isinstance(event, RegionInfo):
            infos.append(event)
            event = self.next_event()
        self._check_regions(infos)
        while isinstance(event, DeviceState):
            states[event.region] = event.state
            event = self.next_event()
        managed = [r for r in self.regions if r.device is not None]
        missing = [r.device.id for r in managed if r.device is not None and r.index not in states]
        if missing or len(states) != len(managed):
            raise MigrationError(f"stream lacks the state of device(s) {quote(missing or sorted(states))}")
        images = []
        for region in managed:
            assert region.device is not None
            check_state(region.device, states[region.index])
            images.append(states[region.index])
        return images, event

    def _check_regions(self, infos: list[RegionInfo]) -> None:
        mine = [r.info() for r in self.regions]
        if len(infos) != len(mine):
            raise MigrationError(
                f"geometry mismatch: the stream has {len(infos)} RAM regions, this machine "
                f"{len(mine)} ({quote([i.name for i in infos])} vs {quote([i.name for i in mine])})"
            )
        for theirs, ours in zip(infos, mine, strict=True):
            for field in ("name", "kind", "size", "page_size", "device_id"):
                if getattr(theirs, field) != getattr(ours, field):
                    raise MigrationError(
                        f"geometry mismatch in RAM region {ours.index} ({quote(ours.name)}): {field} "
                        f"{quote(getattr(theirs, field))} in the stream, {quote(getattr(ours, field))} here"
                    )

    # -- phase 2 -------------------------------------------------------------------------

    def prepare_pages(self, images: list[bytes]) -> None:
        """The runs page sections may fill: the plugged runs of each device's state image
        (not applied yet), every unmanaged region whole."""
        from ramdiscard.providers.virtio_mem.persist import decode_state

        states = iter(images)
        for region in self.regions:
            if region.device is None:
                runs = [(0, region.size)]
            else:
                image = decode_state(next(states))
                runs = plugged_runs(image.bitmap, image.nb_blocks, image.block_size)
            self.runs.append(runs)
            self.starts.append([s for s, _n in runs])

    def check_page(self, page: PageData) -> RamRegion:
        region = self.regions[page.region]
        end = page.offset + page.length
        if page.offset % _ALIGN or page.length % _ALIGN or end > region.size:
            raise StreamError(
                f"page section [{page.offset:#x}, {end:#x}) outside or misaligned in region "
                f"{region.mr.name!r}"
            )
        runs = self.runs[page.region]
        i = bisect_right(self.starts[page.region], page.offset) - 1
        if i < 0 or end > runs[i][0] + runs[i][1]:
            raise StreamError(
                f"page section [{page.offset:#x}, {end:#x}) of region {region.mr.name!r} is not inside "
                "a plugged range"
            )
        return region

    def receive_page(self, page: PageData, *, populated: bool = False) -> None:
        """Check ``page`` against the plugged runs and read its data into guest memory.
        ``populated``: the range is known populated already (a live stream's repeat), so
        it is not populated again first."""
        region = self.check_page(page)
        if region.device is not None and not populated:
            region.mr.ram.populate(page.offset, page.length)  # type: ignore[union-attr]
        target = self.view(page.region)[page.offset : page.offset + page.length]
        if page.file_offset is None:
            base, update = address(target), self.decoder.page_update_at
            self.reader.read_exact(target, lambda pos, got: update(base + pos, got))
            self.position += page.length
            self.tracker.stream(page.length)
            self.decoder.page_done()
        else:
            assert self.pfile is not None
            if page.file_offset < self.position:
                raise StreamError(f"PAGES_AT data offset {page.file_offset:#x} inside the metadata")
            self.pfile.pread_exact(target, page.file_offset)
            if digest(self.decoder.checksum, target) != page.data_checksum:
                raise StreamError(
                    f"page data checksum mismatch (region {region.mr.name!r}, offset {page.offset:#x})"
                )
        self.received[page.region] += page.length
        self.tracker.pages(page.length)

    def check_complete(self, end: End) -> None:
        for region, runs, got in zip(self.regions, self.runs, self.received, strict=True):
            want = sum(n for _s, n in runs)
            if got != want:
                raise StreamError(
                    f"region {region.mr.name!r}: received {got:#x} bytes of {want:#x} populated bytes"
                )


def stream_limits(regions: list[RamRegion]) -> Limits:
    states = [len(r.device.save()) for r in regions if r.device is not None]
    return Limits(regions=len(regions), device_state=max(states, default=0))


def plugged_runs(bitmap: bytes, nbits: int, block_size: int) -> list[tuple[int, int]]:
    """(offset, length) of the plugged runs of a state image's bitmap, ascending."""
    from ramdiscard.rdm.bitmap import Bitmap

    try:
        bits = Bitmap.from_bytes(nbits, bitmap)
    except ValueError as exc:
        raise MigrationError(f"device state bitmap: {exc}") from exc
    return [(s * block_size, (e - s) * block_size) for s, e in bits.runs(0, nbits, True)]


def check_state(device: VirtioMem, state: bytes) -> None:
    from ramdiscard.providers.virtio_mem.persist import StateError, decode_state

    try:
        image = decode_state(state)
    except StateError as exc:
        raise MigrationError(f"device {device.id!r}: {exc}") from exc
    mine = (device.addr, device.region_size, device.block_size, device.node)
    if image.sanity() != mine:
        names = ("addr", "region size", "block size", "node")
        diffs = ", ".join(
            f"{n} {a:#x} != {b:#x}" for n, a, b in zip(names, image.sanity(), mine, strict=True) if a != b
        )
        raise MigrationError(f"geometry mismatch for device {device.id!r}: {diffs}")
    if device.plugged_size:
        raise MigrationError(f"device {device.id!r} has memory plugged; a destination must start empty")


def commit_states(managed: list[RamRegion], images: list[bytes]) -> None:
    """Load each managed region's device state (``images`` in the same order), then discard
    what the loaded states leave unplugged. Raises MigrationError naming the device whose
    state was refused; the caller resets the destination."""
    for region, image in zip(managed, images, strict=True):
        assert region.device is not None
        try:
            region.device.load_state(image)
        except Exception as exc:
            raise MigrationError(f"device {region.device.id!r}: {exc}") from exc
    for region in managed:
        for offset, length in region.discarded_runs():
            region.mr.ram.discard_range(offset, length)  # type: ignore[union-attr]


def reset_to_discarded(regions: list[RamRegion], requested: dict[str, int], freeze: Freeze) -> None:
    """Back to all discarded (module rules); best effort, every step logged on failure."""
    freeze.active = False
    for region in regions:
        dev = region.device
        try:
            if dev is not None:
                if dev.requested_size != requested[dev.id]:
                    dev.requested_size = requested[dev.id]
                dev.unplug_all()
            ram = region.mr.ram
            if isinstance(ram, DiscardableMemory):
                ram.discard_range(0, region.size)
        except Exception:
            log.exception("resetting %r after a failed restore", region.mr.name)


def load_from_reader(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    reader: Reader,
    pfile: PositionalFile | None,
    progress: ProgressFn | None,
    phase: str,
) -> MigrationStats:
    """Load one stream from ``reader`` (module rules); ``pfile`` for sparse snapshots."""
    start = time.perf_counter()
    with frozen(devices) as freeze:
        regions = collect_regions(address_space, devices)
        for dev in devices:
            if dev.plugged_size:
                raise MigrationError(f"device {dev.id!r} has memory plugged; a destination must start empty")
        requested = {dev.id: dev.requested_size for dev in devices}
        tracker = ProgressTracker(phase, 0, progress)
        inc = Incoming(regions, reader, pfile, tracker)
        try:
            images, event = inc.read_metadata()
        except OSError as exc:
            raise MigrationError(f"reading the stream failed (nothing changed): {exc}") from exc
        try:
            managed = [r for r in regions if r.device is not None]
            inc.prepare_pages(images)
            tracker.total = sum(n for runs in inc.runs for _s, n in runs)
            while isinstance(event, PageData):
                inc.receive_page(event)
                event = inc.next_event()
            if not isinstance(event, End):
                raise StreamError(f"unexpected {type(event).__name__} after the page sections")
            inc.check_complete(event)
            commit_states(managed, images)
        except BaseException as exc:
            reset_to_discarded(regions, requested, freeze)
            if isinstance(exc, MigrationError):
                raise
            if isinstance(exc, Exception):
                raise MigrationError(f"restore failed, destination reset to all discarded: {exc!r}") from exc
            raise
        final = tracker.finish()
    return MigrationStats(
        len(regions),
        len(devices),
        event.page_sections,
        event.page_bytes,
        final.stream_bytes,
        time.perf_counter() - start,
    )


def load(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    fileobj: BinaryIO,
    *,
    progress: ProgressFn | None = None,
) -> MigrationStats:
    """Restore what :func:`ramdiscard.migration.save` wrote (stream or sparse snapshot,
    read from the current position; a sparse snapshot must start at offset 0 of a
    seekable file). See the module rules for validation and the failure guarantee."""
    pfile: PositionalFile | None = None
    try:
        if fileobj.seekable():
            pfile = PositionalFile(fileobj)
    except (AttributeError, OSError, io.UnsupportedOperation, MigrationError):
        pfile = None
    return load_from_reader(address_space, devices, FileReader(fileobj), pfile, progress, "restore")
