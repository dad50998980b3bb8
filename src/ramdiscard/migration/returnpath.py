"""The precopy source's return path: the destination's read-position acknowledgements
(``AK``) and its final status, read without blocking (rules in
:mod:`ramdiscard.migration.precopy`)."""

from __future__ import annotations

import errno
import select
import socket
import struct
import time

from ramdiscard.migration.stream import MigrationError, StreamError
from ramdiscard.migration.transport import parse_status

ACK_INTERVAL = 0.05
"""Seconds between two read-position acknowledgements of a live destination."""
RETURN_MSG = struct.Struct("<2sI")
"""Return-path message header: two-letter kind (``AK``), payload length."""
RETURN_POS = struct.Struct("<Q")
"""Payload of ``AK``: the destination's read position in the stream."""


class ReturnPath:
    """The source's reader of the destination's messages (``AK`` position acks, then
    the ``OK``/``ER`` status), without blocking: :meth:`poll` takes what has arrived."""

    def __init__(self, sock: socket.socket, io_timeout: float | None) -> None:
        self.sock = sock
        self.io_timeout = io_timeout
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._buf = bytearray()
        self.acked = 0
        self.acks = 0
        self.progress_at = time.monotonic()
        self.status: bytes | None = None
        """The raw status message (header and text) once one arrived."""
        self.eof = False

    def poll(self) -> None:
        while self.status is None and not self.eof and self._poll.poll(0):
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                    self.eof = True
                    return
                raise
            if not data:
                self.eof = True
                return
            self._buf += data
            self._parse()

    def _parse(self) -> None:
        while len(self._buf) >= RETURN_MSG.size and self.status is None:
            code, length = RETURN_MSG.unpack_from(self._buf)
            if code != b"AK":
                whole = RETURN_MSG.size + (length if length <= 4096 else 0)
                if len(self._buf) >= whole:
                    self.status = bytes(self._buf[:whole])
                return
            if length != RETURN_POS.size:
                raise StreamError(f"the destination sent a malformed acknowledgement (length {length})")
            if len(self._buf) < RETURN_MSG.size + length:
                return
            (pos,) = RETURN_POS.unpack_from(self._buf, RETURN_MSG.size)
            del self._buf[: RETURN_MSG.size + length]
            self.acks += 1
            if pos > self.acked:
                self.acked = pos
                self.progress_at = time.monotonic()

    def sent(self, before: int) -> None:
        """Stream bytes were sent; ``before`` is the stream position before them."""
        if before <= self.acked:
            self.progress_at = time.monotonic()  # nothing was outstanding: a silence starts now

    def check_stall(self, position: int) -> None:
        """Raise TimeoutError when bytes up to ``position`` are outstanding and the
        destination acknowledged nothing for ``io_timeout`` seconds."""
        if self.io_timeout is None or position <= self.acked:
            return
        if time.monotonic() - self.progress_at > self.io_timeout:
            raise TimeoutError("the destination stopped reading")

    def verdict(self, timeout: float | None) -> str | None:
        """Wait (``timeout`` s) for the status; None for success, else its message."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status is None and not self.eof:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left is not None and left <= 0:
                raise MigrationError(f"the destination sent no status within {timeout:g} s")
            if self._poll.poll(None if left is None else int(left * 1000) + 1):
                self.poll()
        if self.status is None:
            raise MigrationError("the destination closed the connection without a status")
        return parse_status(self.status)
