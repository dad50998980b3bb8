"""Byte transports for migration streams: files and TCP sockets (the primitives that move
bytes; saving and loading over a socket is :mod:`ramdiscard.migration.tcp`).

Rules:

* A :class:`Sink` sends a header and optionally a memoryview of guest memory after it,
  completely or not at all from the caller's view (partial sends are continued; an error
  raises). Guest memory is passed to the kernel as a memoryview: never copied in Python.
* A :class:`Reader` fills a memoryview completely (``read_exact``) or raises
  :class:`StreamError` ("truncated") at end of stream; data goes straight into the target
  memory, guest memory included. With ``on_data`` it reads at most :data:`READ_PIECE`
  bytes per call and reports each piece as ``on_data(offset in view, length)`` as soon as
  it landed, while it is still in the CPU cache (the destination checksums it there
  instead of reading guest memory a second time).
* Every socket send/recv passes ``faults.checkpoint(Op.SOCK_SEND / Op.SOCK_RECV)`` first,
  every file write/read ``Op.FILE_WRITE / Op.FILE_READ``.
* Over TCP the destination answers the finished stream with a status message
  (:func:`send_status` / :func:`recv_status`): ``OK``, or ``ER`` plus a UTF-8 reason of
  at most 4096 bytes (its MigrationError); anything else is a MigrationError.
* A :class:`SocketReader` whose peer stays silent for the socket's timeout raises
  :class:`ReadTimeout`; a :class:`SocketSink` whose peer answered before the end of the
  stream raises :class:`PeerAnswered` before sending more guest memory.
* Readiness is asked with ``poll`` (never ``select``, which cannot take descriptors
  above 1023).
"""

from __future__ import annotations

import io
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import BinaryIO, Protocol

from ramdiscard import faults
from ramdiscard.errors import ProtocolViolation
from ramdiscard.faults import Op
from ramdiscard.migration.stream import Buffer, MigrationError, StreamError

_STATUS = struct.Struct("<2sI")
STATUS_TIMEOUT = 60.0
"""Default seconds for a connect and for the wait for the destination's status."""
IO_TIMEOUT = 60.0
"""Default seconds of silence (receiver) or of a peer not reading (sender) before failing."""
READ_PIECE = 512 * 1024
"""Largest read when the caller checksums each piece: fits a 1 MiB L2 (a loopback recv
returns less than that most of the time anyway, so the cap adds few syscalls)."""

SEND_PIECE = 1024 * 1024
"""Largest ``sendmsg`` of guest memory: the best size for a plain loopback copy
(``ramdiscard.bench.migration`` sweep, 2 vCPUs: about 160 ms per GiB with 1 MiB sends
against 240 ms with 4 MiB ones)."""

OnData = Callable[[int, int], None]
"""``on_data(offset, length)``: bytes ``[offset, offset + length)`` of the view just landed."""


class Sink(Protocol):
    def send(self, header: bytes, data: memoryview | None = None) -> None: ...


class Reader(Protocol):
    def read_exact(self, view: memoryview, on_data: OnData | None = None) -> None: ...


class ReadTimeout(StreamError):
    """The peer sent nothing for the socket's timeout."""


class PeerAnswered(MigrationError, ProtocolViolation):
    """The destination sent its status before the stream ended (it refused the stream)."""


class SocketSink:
    """Sends with ``sendmsg``: the header together with the first :data:`SEND_PIECE`
    bytes of guest memory, the rest in pieces of that size (one large ``sendmsg`` holds
    the socket while the kernel copies it all, and the receiver waits for the lot).

    Before each page chunk it polls (without blocking) whether the destination has
    already answered: a destination that refuses the stream says so at once, and the
    source stops instead of pushing the rest of guest memory into a closed connection.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)

    def send(self, header: bytes, data: memoryview | None = None) -> None:
        if data is None:
            faults.checkpoint(Op.SOCK_SEND)
            self.sock.sendall(header)
            return
        if self._poll.poll(0):
            raise PeerAnswered("the destination answered before the end of the stream")
        faults.checkpoint(Op.SOCK_SEND)
        sent = self.sock.sendmsg([header, data[:SEND_PIECE]])
        if sent < len(header):
            faults.checkpoint(Op.SOCK_SEND)
            self.sock.sendall(header[sent:])
            sent = len(header)
        pos, n = sent - len(header), data.nbytes
        while pos < n:
            faults.checkpoint(Op.SOCK_SEND)
            pos += self.sock.send(data[pos : pos + SEND_PIECE])


class SocketReader:
    """Reads with the socket's own timeout: silence that long raises StreamError."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read_exact(self, view: memoryview, on_data: OnData | None = None) -> None:
        pos, n = 0, view.nbytes
        limit = n if on_data is None else READ_PIECE
        recv_into = self.sock.recv_into
        while pos < n:
            faults.checkpoint(Op.SOCK_RECV)
            try:
                got = recv_into(view[pos:], min(n - pos, limit))
            except TimeoutError:
                raise ReadTimeout(
                    f"no data from the peer for {self.sock.gettimeout():g} s (read timeout)"
                ) from None
            if got == 0:
                raise StreamError(f"stream truncated: connection closed {n - pos} bytes early")
            if on_data is not None:
                on_data(pos, got)
            pos += got


class FileSink:
    """Writes to a binary file object (anything with ``write``)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.f = fileobj

    def _write(self, buf: Buffer) -> None:
        with memoryview(buf) as view:
            pos = 0
            while pos < view.nbytes:
                faults.checkpoint(Op.FILE_WRITE)
                n = self.f.write(view[pos:])
                pos += view.nbytes - pos if n is None else n

    def send(self, header: bytes, data: memoryview | None = None) -> None:
        self._write(header)
        if data is not None:
            self._write(data)


class FileReader:
    """Reads from a binary file object (anything with ``readinto``)."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.f = fileobj

    def read_exact(self, view: memoryview, on_data: OnData | None = None) -> None:
        pos, n = 0, view.nbytes
        limit = n if on_data is None else READ_PIECE
        while pos < n:
            faults.checkpoint(Op.FILE_READ)
            got = self.f.readinto(view[pos : pos + min(n - pos, limit)])  # type: ignore[attr-defined]
            if not got:
                raise StreamError(f"stream truncated: end of file {n - pos} bytes early")
            if on_data is not None:
                on_data(pos, got)
            pos += got


class PositionalFile:
    """Reads and writes at file offsets (``pread``/``pwrite`` on the descriptor when there
    is one, seek + read/write otherwise); used by sparse snapshot files."""

    def __init__(self, fileobj: BinaryIO) -> None:
        self.f = fileobj
        try:
            self.fd: int | None = fileobj.fileno()
        except (AttributeError, OSError, io.UnsupportedOperation):
            self.fd = None
        if not fileobj.seekable():
            raise MigrationError("a sparse snapshot needs a seekable file")

    def size(self) -> int:
        if self.fd is not None:
            return os.fstat(self.fd).st_size
        return self.f.seek(0, io.SEEK_END)

    def truncate(self, size: int) -> None:
        faults.checkpoint(Op.FILE_WRITE)
        self.f.flush()
        if self.fd is not None:
            os.ftruncate(self.fd, size)
        else:
            self.f.truncate(size)

    def pwrite(self, data: Buffer, offset: int) -> None:
        with memoryview(data) as view:
            pos = 0
            while pos < view.nbytes:
                faults.checkpoint(Op.FILE_WRITE)
                if self.fd is not None:
                    n = os.pwrite(self.fd, view[pos:], offset + pos)
                else:
                    self.f.seek(offset + pos)
                    n = self.f.write(view[pos:])
                pos += n

    def pread_exact(self, view: memoryview, offset: int) -> None:
        pos, n = 0, view.nbytes
        while pos < n:
            faults.checkpoint(Op.FILE_READ)
            if self.fd is not None:
                got = os.preadv(self.fd, [view[pos:]], offset + pos)
            else:
                self.f.seek(offset + pos)
                got = self.f.readinto(view[pos:]) or 0  # type: ignore[attr-defined]
            if got == 0:
                raise StreamError(f"snapshot truncated: no data at file offset {offset + pos:#x}")
            pos += got


# -- TCP endpoints ----------------------------------------------------------------------------


def send_status(sock: socket.socket, error: str | None) -> None:
    msg = b"" if error is None else error.encode()[:4096]
    faults.checkpoint(Op.SOCK_SEND)
    sock.sendall(_STATUS.pack(b"OK" if error is None else b"ER", len(msg)) + msg)


def recv_status(sock: socket.socket) -> str | None:
    """The destination's verdict: None for success, else its error message."""
    reader = SocketReader(sock)
    head = bytearray(_STATUS.size)
    try:
        reader.read_exact(memoryview(head))
    except StreamError as exc:
        raise MigrationError("the destination closed the connection without a status") from exc
    length = _status_length(head)
    if length is None:
        return None
    msg = bytearray(length)
    reader.read_exact(memoryview(msg))
    return msg.decode(errors="replace")


def parse_status(data: bytes) -> str | None:
    """The verdict in a status message already received whole (header and reason), as
    :func:`recv_status` reads it; MigrationError when it is malformed or cut short."""
    length = _status_length(data[: _STATUS.size]) if len(data) >= _STATUS.size else -1
    if length is None:
        return None
    if length < 0 or len(data) < _STATUS.size + length:
        raise MigrationError("the destination closed the connection without a status")
    return data[_STATUS.size : _STATUS.size + length].decode(errors="replace")


def _status_length(head: bytes | bytearray) -> int | None:
    """None for ``OK``, the reason's length for ``ER``; MigrationError for anything else."""
    code, length = _STATUS.unpack(head)
    if code == b"OK" and length == 0:
        return None
    if code != b"ER" or length > 4096:
        raise MigrationError(f"the destination sent a malformed status {bytes(head)!r}")
    return int(length)
