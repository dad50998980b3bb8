"""The background snapshot's page saver: a process of its own (``python -m``).

Rules (live-migration.md, pitfall 1: a write-protect handler must never wait for the
faulting process's GIL; a separate process never does):

* Started with the userfaultfd (synchronous write protection, already registered and
  protecting the populated ranges), the snapshot file and a JSON job on stdin: the guest
  process id and the runs ``[host address, length, file offset]`` to save.
* Reads guest memory through ``/proc/PID/mem`` (reading never faults on write
  protection) and writes each page at its file offset with ``pwrite``.
* Faults first: before each background chunk, every queued write fault is served: the
  page is saved unless it already was, then unprotected (which lets the writer go on).
  A background chunk saves the pages of the chunk not saved yet and then unprotects the
  chunk; a page is unprotected only once saved, so the file holds every page as it was
  when protected.
* Prints ``ready`` once set up and, when every run is saved and unprotected,
  ``done FAULTS BYTES``; exits 0. Any error: a one-line message on stderr, exit 1 (the
  parent then unprotects everything itself).
"""

from __future__ import annotations

import json
import os
import select
import struct
import sys
from bisect import bisect_right

PAGE = 4096
CHUNK = 256 * 1024
_MSG = struct.Struct("<B7xQQ8x")


def _spans(saved: bytearray, first: int, count: int) -> list[tuple[int, int]]:
    """Runs (page index, pages) of unsaved pages in ``[first, first + count)``."""
    out: list[tuple[int, int]] = []
    i, end = first, first + count
    while i < end:
        if saved[i]:
            i += 1
            continue
        j = i
        while j < end and not saved[j]:
            j += 1
        out.append((i, j - i))
        i = j
    return out


def run(uffd_fd: int, file_fd: int, pid: int, runs: list[tuple[int, int, int]]) -> tuple[int, int]:
    from ramdiscard.hostmem.uffd import MSG_SIZE, PAGEFAULT_FLAG_WP, UFFD_EVENT_PAGEFAULT, writeprotect

    runs = sorted(runs)
    starts = [a for a, _n, _f in runs]
    saved = [bytearray(n // PAGE) for _a, n, _f in runs]
    mem = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    poller = select.poll()
    poller.register(uffd_fd, select.POLLIN)
    faults = written = 0

    def save(i: int, first: int, count: int) -> None:
        nonlocal written
        addr, _n, foff = runs[i]
        spans = _spans(saved[i], first, count)
        if not spans:
            return
        lo, hi = spans[0][0], spans[-1][0] + spans[-1][1]
        got = os.preadv(mem, [view[: (hi - lo) * PAGE]], addr + lo * PAGE)
        if got != (hi - lo) * PAGE:
            raise OSError(f"short read of guest memory at {addr + lo * PAGE:#x}")
        for s, k in spans:
            data = view[(s - lo) * PAGE : (s - lo + k) * PAGE]
            if os.pwrite(file_fd, data, foff + s * PAGE) != k * PAGE:
                raise OSError("short write to the snapshot file")
            saved[i][s : s + k] = b"\x01" * k
            written += k * PAGE

    def serve() -> None:
        nonlocal faults
        while poller.poll(0):
            try:
                data = os.read(uffd_fd, MSG_SIZE * 64)
            except BlockingIOError:
                return
            for k in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
                event, flags, address = _MSG.unpack_from(data, k)
                if event != UFFD_EVENT_PAGEFAULT or not flags & PAGEFAULT_FLAG_WP:
                    continue
                address &= ~(PAGE - 1)
                i = bisect_right(starts, address) - 1
                if i < 0 or address >= runs[i][0] + runs[i][1]:
                    continue  # not ours to save; unprotect below lets the writer go on
                faults += 1
                save(i, (address - runs[i][0]) // PAGE, 1)
                writeprotect(uffd_fd, address, PAGE, False)

    for i, (addr, length, _foff) in enumerate(runs):
        for off in range(0, length, CHUNK):
            serve()
            n = min(CHUNK, length - off)
            save(i, off // PAGE, n // PAGE)
            writeprotect(uffd_fd, addr + off, n, False)
    serve()
    return faults, written


def main() -> int:
    try:
        uffd_fd, file_fd = int(sys.argv[1]), int(sys.argv[2])
        import ramdiscard.hostmem.uffd  # noqa: F401  (imported before "ready": it is slow)

        sys.stdout.write("ready\n")
        sys.stdout.flush()
        job = json.loads(sys.stdin.readline())
        faults, written = run(uffd_fd, file_fd, int(job["pid"]), [tuple(r) for r in job["runs"]])
    except Exception as exc:  # reported to the parent, which cleans up
        sys.stderr.write(f"snapshot saver: {exc}\n")
        return 1
    sys.stdout.write(f"done {faults} {written}\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
