"""Background snapshot: a sparse snapshot file of memory as of the start, written while
the guest keeps running (QEMU's ``background-snapshot`` capability).

Rules (live-migration.md; file layout: the sparse snapshot of ``docs/migration-format.md``,
QEMU's "mapped-ram" style: every page at a fixed offset, holes for discarded memory):

* The devices are frozen (plug/unplug answer BUSY) for the whole snapshot, so the
  populated runs stay those of the start.
* Setup: a userfaultfd in synchronous write-protect mode is registered over each RAM
  region and handed to a saver process (:mod:`ramdiscard.migration.snapshot_worker`);
  then the guest is paused, the device states are taken, **only the populated runs** are
  write-protected, ``on_start`` is called (guest still paused: memory is exactly what the
  file will hold) and the guest resumes. Discarded memory is never protected or read.
* The saver, a separate process (a handler in this process could wait on the GIL held
  by the very thread that faulted: spec pitfall 1), saves a page before its first write
  goes ahead and writes the rest in the background, unprotecting as it goes.
* Data first, metadata (with each chunk's checksum, read back from the file) last, so an
  interrupted snapshot has no valid header. :func:`ramdiscard.migration.load` restores it.
* Failure or ``cancel``: the saver is killed, every range unprotected (waiting writers
  go on), the file truncated to empty, the devices unfrozen; MigrationError is raised.
  The guest runs on unchanged.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from ramdiscard.errors import HostMemoryError
from ramdiscard.hostmem.uffd import SyncWriteProtect
from ramdiscard.migration.busy import frozen
from ramdiscard.migration.checksum import Checksum, digest
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.layout import collect_regions
from ramdiscard.migration.source import DEFAULT_CHUNK, check_chunk_size, sparse_layout, split_runs
from ramdiscard.migration.stream import Counter, MigrationError, encode_end, encode_pages_at

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.migration.precopy import GuestControl
    from ramdiscard.providers.virtio_mem import VirtioMem

PAGE = 4096
READY_TIMEOUT = 60.0
"""Seconds the saver process may take to start."""


@dataclass
class SnapshotStats:
    page_bytes: int = 0
    """Populated bytes saved (the plugged memory at the start)."""
    faults: int = 0
    """Pages saved ahead of a guest write."""
    file_size: int = 0
    metadata_bytes: int = 0
    """Length of the metadata at the start of the file."""
    pause_time: float = 0.0
    """Seconds the guest was paused at the start (protection of the populated runs)."""
    total_time: float = 0.0


class _Saver:
    def __init__(self, uffd: int, fd: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ramdiscard.migration.snapshot_worker", str(uffd), str(fd)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(uffd, fd),
        )  # fmt: skip

    def line(self, deadline: float, cancel: threading.Event) -> str:
        assert self.proc.stdout is not None
        out = self.proc.stdout
        poller = select.poll()
        poller.register(out.fileno(), select.POLLIN | select.POLLHUP)
        while True:
            if cancel.is_set():
                raise MigrationError("snapshot cancelled")
            if poller.poll(50):
                break
            if time.monotonic() > deadline:
                raise MigrationError("the snapshot saver process did not answer in time")
        text = out.readline().decode(errors="replace").strip()
        if not text:
            self.proc.wait(5)
            assert self.proc.stderr is not None
            why = self.proc.stderr.read().decode(errors="replace").strip() or f"exit {self.proc.returncode}"
            raise MigrationError(f"snapshot failed: {why}")
        return text

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def background_snapshot(
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    fileobj: BinaryIO,
    guest: GuestControl | None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    checksum: Checksum | None = None,
    on_start: Callable[[], None] | None = None,
    cancel: threading.Event | None = None,
    timeout: float = 600.0,
) -> SnapshotStats:
    """Write a sparse snapshot of memory as of the start into ``fileobj`` (a real,
    seekable file; truncated first) while ``guest`` keeps running (module rules).
    ``timeout`` bounds the whole background copy. Raises MigrationError (file left
    empty, guest running, nothing protected) or ValueError for a bad chunk size."""
    check_chunk_size(chunk_size)
    algo = checksum or default_checksum()
    cancel = cancel or threading.Event()
    fd = fileobj.fileno()
    t0 = time.perf_counter()
    stats = SnapshotStats()
    with frozen(devices):
        regions = collect_regions(address_space, devices)
        for r in regions:
            if r.page_size != PAGE:
                raise MigrationError(f"region {r.mr.name!r}: background snapshot needs 4 KiB pages")
        shmem = any(getattr(r.mr.ram, "fd", None) is not None for r in regions)
        try:
            wp = SyncWriteProtect(shmem=shmem)
        except HostMemoryError as exc:
            raise MigrationError(f"background snapshot unavailable: {exc}") from None
        saver: _Saver | None = None
        paused = False
        try:
            try:
                for r in regions:
                    wp.register(r.mr.ram.host_address, r.size)  # type: ignore[union-attr]
            except HostMemoryError as exc:
                raise MigrationError(f"background snapshot unavailable: {exc}") from None
            assert wp.fd is not None
            saver = _Saver(wp.fd, fd)
            if saver.line(time.monotonic() + READY_TIMEOUT, cancel) != "ready":
                raise MigrationError("the snapshot saver process did not start")
            t_pause = time.perf_counter()
            if guest is not None:
                guest.pause()
                paused = True
            runs = [r.populated_runs() for r in regions]
            counter = Counter()
            meta, bases, file_size, meta_len = sparse_layout(regions, runs, counter, algo, chunk_size)
            os.ftruncate(fd, 0)
            os.ftruncate(fd, file_size)
            job = []
            for r, rr, base in zip(regions, runs, bases, strict=True):
                host = r.mr.ram.host_address  # type: ignore[union-attr]
                for s, n in rr:
                    wp.protect(host + s, n)
                    job.append((host + s, n, base + s))
            if on_start is not None:
                on_start()
            if guest is not None:
                guest.resume()
                paused = False
            stats.pause_time = time.perf_counter() - t_pause
            assert saver.proc.stdin is not None
            saver.proc.stdin.write(json.dumps({"pid": os.getpid(), "runs": job}).encode() + b"\n")
            saver.proc.stdin.flush()
            done = saver.line(time.monotonic() + timeout, cancel).split()
            if len(done) != 3 or done[0] != "done":
                raise MigrationError(f"the snapshot saver said {' '.join(done)[:200]!r}")
            stats.faults, stats.page_bytes = int(done[1]), int(done[2])
            want = sum(n for rr in runs for _s, n in rr)
            if stats.page_bytes != want:
                raise MigrationError(f"the snapshot saver wrote {stats.page_bytes} of {want} bytes")
            saver.kill()
            saver = None
            wp.close()
            buf = bytearray(chunk_size)
            rfd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)  # fileobj may be write-only
            try:
                for r, rr, base in zip(regions, runs, bases, strict=True):
                    for s, n in split_runs(rr, chunk_size):
                        view = memoryview(buf)[:n]
                        if os.preadv(rfd, [view], base + s) != n:
                            raise MigrationError("short read of the snapshot file")
                        meta.append(encode_pages_at(r.index, s, n, base + s, digest(algo, view)))
                        counter.pages(n)
            finally:
                os.close(rfd)
            meta.append(encode_end(counter.end()))
            blob = b"".join(meta)
            assert len(blob) == meta_len
            os.pwrite(fd, blob, 0)
            stats.file_size, stats.metadata_bytes = file_size, meta_len
        except BaseException as exc:
            if saver is not None:
                saver.kill()
            wp.close()
            if paused and guest is not None:
                guest.resume()
            os.ftruncate(fd, 0)
            if isinstance(exc, OSError):
                raise MigrationError(f"snapshot failed: {exc}") from exc
            raise
        finally:
            wp.close()
    stats.total_time = time.perf_counter() - t0
    return stats
