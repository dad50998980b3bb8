"""The migration source: save an address space's RAM and its virtio-mem devices.

Rules (qemu-ram-discard §3.10, §4.2):

* Every device is frozen (busy) before anything is read and released after the last
  byte, also on failure; the populated runs therefore stay valid for the whole save.
* Order: REGION table, DEVICE states ("early", before any RAM: sanity block, sizes,
  bitmap), the RAM of every populated run, END.
* Populated runs come from each manager's ``replay_populated``; memory is never scanned,
  and discarded memory is never read (reading it could populate it; its content is
  undefined anyway). A region without a manager is sent whole.
* Runs are sent in chunks of at most ``chunk_size`` bytes, each a memoryview slice of the
  RAM block's view handed to the transport: no copy of guest memory is made in Python.
* Sparse snapshot files (:func:`save_sparse`): page data is written at file offsets that
  mirror region offsets, so discarded memory stays a hole in the file (layout in
  ``docs/migration-format.md``). The metadata at the start of the file is written last:
  an interrupted snapshot has no valid header.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ramdiscard.migration.busy import frozen
from ramdiscard.migration.checksum import Checksum, digest
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.layout import RamRegion, collect_regions
from ramdiscard.migration.progress import ProgressFn, ProgressTracker
from ramdiscard.migration.stream import (
    END_SECTION_SIZE,
    MAX_CHUNK,
    PAGES_AT_SECTION_SIZE,
    Counter,
    MigrationError,
    StreamFlags,
    encode_device,
    encode_end,
    encode_pages_at,
    encode_region,
    encode_stream_header,
    page_header,
)
from ramdiscard.migration.transport import FileSink, PositionalFile, Sink
from ramdiscard.units import MiB, align_up

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.providers.virtio_mem import VirtioMem

DEFAULT_CHUNK = 4 * MiB
SPARSE_ALIGN = 1 * MiB
"""Alignment of the data area and of every region's place in it (sparse snapshots)."""


@dataclass(frozen=True, slots=True)
class MigrationStats:
    regions: int
    devices: int
    page_sections: int
    page_bytes: int
    stream_bytes: int
    seconds: float

    @property
    def rate(self) -> float:
        """Page bytes per second."""
        return self.page_bytes / self.seconds if self.seconds > 0 else 0.0


def split_runs(runs: list[tuple[int, int]], chunk: int) -> Iterator[tuple[int, int]]:
    """Each ``(start, length)`` run in order, cut into pieces of at most ``chunk`` bytes."""
    for start, length in runs:
        end = start + length
        while start < end:
            n = min(chunk, end - start)
            yield start, n
            start += n


def check_chunk_size(chunk_size: int) -> None:
    """MigrationError unless ``chunk_size`` is a multiple of 4 KiB in [4 KiB, MAX_CHUNK]."""
    if not 4096 <= chunk_size <= MAX_CHUNK or chunk_size % 4096:
        raise MigrationError(f"chunk size {chunk_size:#x}: must be a multiple of 4 KiB up to {MAX_CHUNK:#x}")


def _metadata(regions: list[RamRegion], counter: Counter, flags: StreamFlags, algo: Checksum) -> list[bytes]:
    out = [encode_stream_header(flags, algo)]
    for region in regions:
        out.append(encode_region(region.info()))
        counter.meta()
    for region in regions:
        if region.device is not None:
            out.append(encode_device(region.index, region.device.save_state()))
            counter.meta()
    return out


def save_to_sink(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    sink: Sink,
    chunk_size: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
    *,
    phase: str = "send",
    checksum: Checksum | None = None,
) -> MigrationStats:
    """Write a streamed migration to ``sink`` (module rules). ``checksum``: page data
    checksum, default the fastest available (XXH3-64, else CRC-32)."""
    check_chunk_size(chunk_size)
    algo = checksum or default_checksum()
    start = time.perf_counter()
    with frozen(devices):
        regions = collect_regions(address_space, devices)
        runs = [region.populated_runs() for region in regions]
        counter = Counter()
        tracker = ProgressTracker(phase, sum(n for r in runs for _o, n in r), progress)
        for piece in _metadata(regions, counter, StreamFlags.NONE, algo):
            sink.send(piece)
            tracker.stream(len(piece))
        for region, region_runs in zip(regions, runs, strict=True):
            view = region.view
            for offset, length in split_runs(region_runs, chunk_size):
                data = view[offset : offset + length]
                header = page_header(region.index, offset, data, algo)
                sink.send(header, data)
                counter.pages(length)
                tracker.stream(len(header) + length)
                tracker.pages(length)
        end = encode_end(counter.end())
        sink.send(end)
        tracker.stream(len(end))
        final = tracker.finish()
    return MigrationStats(
        len(regions),
        len(devices),
        counter.page_sections,
        counter.page_bytes,
        final.stream_bytes,
        time.perf_counter() - start,
    )


def sparse_layout(
    regions: list[RamRegion],
    runs: list[list[tuple[int, int]]],
    counter: Counter,
    algo: Checksum,
    chunk_size: int,
) -> tuple[list[bytes], list[int], int, int]:
    """The layout of a sparse snapshot (``docs/migration-format.md``): the metadata
    sections before the PAGES_AT references, each region's file offset, the file size
    and the metadata's final length (with one PAGES_AT per chunk of ``runs`` and END)."""
    meta = _metadata(regions, counter, StreamFlags.SPARSE, algo)
    nchunks = sum(1 for r in runs for _c in split_runs(r, chunk_size))
    meta_len = sum(len(p) for p in meta) + nchunks * PAGES_AT_SECTION_SIZE + END_SECTION_SIZE
    bases, pos = [], align_up(meta_len, SPARSE_ALIGN)
    for region in regions:
        bases.append(pos)
        pos += align_up(region.size, SPARSE_ALIGN)
    return meta, bases, pos, meta_len


def save_sparse(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    fileobj: BinaryIO,
    chunk_size: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
    checksum: Checksum | None = None,
) -> MigrationStats:
    """Write a sparse snapshot file; the file is truncated first and holds only the
    snapshot afterwards (module rules; layout in ``docs/migration-format.md``)."""
    check_chunk_size(chunk_size)
    algo = checksum or default_checksum()
    pfile = PositionalFile(fileobj)
    start = time.perf_counter()
    with frozen(devices):
        regions = collect_regions(address_space, devices)
        runs = [region.populated_runs() for region in regions]
        counter = Counter()
        meta, bases, file_size, meta_len = sparse_layout(regions, runs, counter, algo, chunk_size)
        tracker = ProgressTracker("snapshot", sum(n for r in runs for _o, n in r), progress)
        pfile.truncate(0)
        refs: list[bytes] = []
        for region, region_runs, base in zip(regions, runs, bases, strict=True):
            view = region.view
            for offset, length in split_runs(region_runs, chunk_size):
                data = view[offset : offset + length]
                crc = digest(algo, data)
                pfile.pwrite(data, base + offset)
                refs.append(encode_pages_at(region.index, offset, length, base + offset, crc))
                counter.pages(length)
                tracker.stream(length)
                tracker.pages(length)
        meta.extend(refs)
        meta.append(encode_end(counter.end()))
        blob = b"".join(meta)
        assert len(blob) == meta_len
        pfile.truncate(file_size)
        pfile.pwrite(blob, 0)
        fileobj.flush()
        if pfile.fd is None:
            fileobj.seek(0, io.SEEK_END)
        tracker.stream(len(blob))
        final = tracker.finish()
    return MigrationStats(
        len(regions),
        len(devices),
        counter.page_sections,
        counter.page_bytes,
        final.stream_bytes,
        time.perf_counter() - start,
    )


def _is_real_file(fileobj: BinaryIO) -> bool:
    try:
        fileobj.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False
    try:
        return bool(fileobj.seekable())
    except (AttributeError, OSError):
        return False


def save(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    fileobj: BinaryIO,
    *,
    sparse: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    progress: ProgressFn | None = None,
    checksum: Checksum | None = None,
) -> MigrationStats:
    """Save the RAM of ``address_space`` and the state of ``devices`` into ``fileobj``.

    ``sparse`` None: a sparse snapshot for a seekable file with a descriptor (the file is
    truncated and holds the snapshot only), a plain stream otherwise (written at the
    current position: pipes, BytesIO). Devices answer BUSY for the whole save.

    Raises MigrationError for a configuration that cannot be migrated (a managed region
    without its device, a region without memory view), OSError from the file.
    """
    if sparse is None:
        sparse = _is_real_file(fileobj)
    if sparse:
        return save_sparse(address_space, devices, fileobj, chunk_size, progress, checksum)
    stats = save_to_sink(
        address_space, devices, FileSink(fileobj), chunk_size, progress, phase="snapshot", checksum=checksum
    )
    fileobj.flush()
    return stats
