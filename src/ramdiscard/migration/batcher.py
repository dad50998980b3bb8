"""The precopy source's sender: page sections batched into few ``sendmsg`` calls,
with bandwidth throttling, cancel and stall checks (rules in
:mod:`ramdiscard.migration.precopy`)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Protocol

import numpy as np

from ramdiscard.migration.returnpath import ReturnPath
from ramdiscard.migration.stream import MigrationError
from ramdiscard.migration.transport import PeerAnswered


class StreamCounters(Protocol):
    """The running figures a batcher adds to (a ``PrecopyStats`` is one)."""

    stream_bytes: int


class SendLimits(Protocol):
    """The parameters a batcher obeys (a ``PrecopyParams`` is one)."""

    @property
    def max_bandwidth(self) -> int: ...


PAGE = 4096
CHUNK = 1 << 20
"""Largest page section of a contiguous dirty run."""
BATCH_BYTES = 1 << 20
BATCH_IOV = 512
CANCEL_POLL = 0.05
"""Longest throttling sleep between two looks at ``cancel`` and the return path."""


class Batcher:
    """Sends page sections with few ``sendmsg`` calls: headers and guest-memory views
    go out as one iovec list (no copy in Python). Before every send and while it
    throttles it reads the return path (module rules: cancel, stall, early status)."""

    def __init__(
        self,
        sock: socket.socket,
        stats: StreamCounters,
        params: SendLimits,
        cancel: threading.Event,
        ret: ReturnPath,
    ) -> None:
        self.sock = sock
        self.stats = stats
        self.params = params
        self.cancel = cancel
        self.ret = ret
        self.bufs: list[bytes | memoryview] = []
        self.bytes = 0
        self._t0 = time.perf_counter()
        self._sent = 0
        self.throttle = True
        self._bounce = bytearray(BATCH_BYTES + CHUNK)
        self._used = 0

    def copy(self, data: memoryview) -> memoryview:
        """A copy of ``data`` in this batch's bounce buffer (valid until the flush):
        memory the guest is writing is checksummed and sent as one consistent copy."""
        n = data.nbytes
        self.make_room(n)
        dst = memoryview(self._bounce)[self._used : self._used + n]
        dst[:] = data
        self._used += n
        return dst

    def gather(self, pages: np.ndarray, offsets: list[int]) -> memoryview:
        """Copies of the 4 KiB pages at ``offsets`` of ``pages`` (a region as rows of one
        page), in order, in this batch's bounce buffer: call :meth:`make_room` first."""
        n = len(offsets)
        dst = memoryview(self._bounce)[self._used : self._used + n * PAGE]
        idx = np.fromiter(offsets, dtype=np.int64, count=n) // PAGE
        np.take(pages, idx, axis=0, out=np.frombuffer(dst, dtype=np.uint8).reshape(n, PAGE), mode="clip")
        self._used += n * PAGE
        return dst

    def make_room(self, n: int) -> None:
        """Flush now unless ``n`` more bytes fit the bounce buffer."""
        if self._used + n > len(self._bounce):
            self.flush()

    def add(self, header: bytes, data: memoryview | None = None) -> None:
        self.bufs.append(header)
        self.bytes += len(header)
        if data is not None:
            self.bufs.append(data)
            self.bytes += data.nbytes
        if self.bytes >= BATCH_BYTES or len(self.bufs) >= BATCH_IOV:
            self.flush()

    def check(self) -> None:
        """Raise when cancelled, when the destination answered or hung up, or when it
        stalled (module rules)."""
        if self.cancel.is_set():
            raise MigrationError("migration cancelled")
        self.ret.poll()
        if self.ret.status is not None or self.ret.eof:
            raise PeerAnswered("the destination answered before the end of the stream")
        self.ret.check_stall(self.stats.stream_bytes)

    def flush(self) -> None:
        if not self.bufs:
            return
        self.check()
        bufs, total = self.bufs, self.bytes
        self.bufs, self.bytes, self._used = [], 0, 0
        limit = self.sock.gettimeout()
        deadline = None if limit is None else time.monotonic() + limit
        while bufs:
            # The socket timeout bounds each call; a peer reading a trickle would reset it,
            # so the whole batch (about 1 MiB) gets one bound too.
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("send stalled")
            n = self.sock.sendmsg(bufs)
            while n:
                first = bufs[0]
                size = len(first) if isinstance(first, bytes) else first.nbytes
                if n >= size:
                    n -= size
                    bufs.pop(0)
                else:
                    bufs[0] = memoryview(first)[n:]
                    n = 0
        before = self.stats.stream_bytes
        self.stats.stream_bytes += total
        self.ret.sent(before)
        self._sent += total
        rate = self.params.max_bandwidth
        if rate and self.throttle:
            while (ahead := self._sent / rate - (time.perf_counter() - self._t0)) > 0:
                self.cancel.wait(min(ahead, CANCEL_POLL))
                self.check()
