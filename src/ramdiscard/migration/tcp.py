"""Saving and loading a machine's memory over TCP (live-migration style).

Rules:

* :func:`migrate_to` connects, streams every region (:func:`~ramdiscard.migration.source.
  save_to_sink`), half-closes and waits for the destination's status; it reports success
  only when the destination has loaded everything. The devices are busy from the first
  byte until that answer (or a failure).
* :func:`receive_from` accepts one connection, loads the stream
  (:func:`~ramdiscard.migration.destination.load_from_reader`) and answers ``OK`` or ``ER``
  with the reason (:func:`~ramdiscard.migration.transport.send_status`); after a refusal
  it drains what the source still sends, so the source can read the reason.
* Every socket operation has a timeout: a peer silent (receiver) or not reading (sender)
  for that many seconds fails the migration with a one-line :class:`MigrationError`
  (:data:`~ramdiscard.migration.transport.IO_TIMEOUT` unless the caller gives another). A
  sender's socket can be shut down from another thread (``migrate_cancel``): the
  migration then fails at once.

The bytes move through :mod:`ramdiscard.migration.transport`'s socket sink and reader.
"""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ramdiscard import faults
from ramdiscard.faults import Op
from ramdiscard.migration.destination import load_from_reader
from ramdiscard.migration.source import DEFAULT_CHUNK, MigrationStats, save_to_sink
from ramdiscard.migration.stream import MigrationError
from ramdiscard.migration.transport import (
    IO_TIMEOUT,
    STATUS_TIMEOUT,
    PeerAnswered,
    ReadTimeout,
    SocketReader,
    SocketSink,
    recv_status,
    send_status,
)

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace
    from ramdiscard.migration.progress import ProgressFn
    from ramdiscard.providers.virtio_mem import VirtioMem


def migrate_to(
    host: str,
    port: int,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    *,
    chunk_size: int | None = None,
    progress: ProgressFn | None = None,
    timeout: float | None = STATUS_TIMEOUT,
    io_timeout: float = IO_TIMEOUT,
    on_socket: Callable[[socket.socket], None] | None = None,
) -> MigrationStats:
    """Migrate to a destination listening on ``host:port`` (:func:`receive_from` there).

    Devices are busy from the first byte until the destination's answer (or a failure).
    ``timeout`` bounds the connect and the wait for the final status, ``io_timeout`` each
    send (a destination that stops reading). ``on_socket`` gets the connected socket
    before anything is sent (shutting it down from another thread cancels). Returns the
    statistics; raises MigrationError if the destination refused the stream, stopped
    reading or the socket was shut down, OSError for connection problems.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(io_timeout)
        tune_socket(sock)
        if on_socket is not None:
            on_socket(sock)
        try:
            stats = save_to_sink(
                address_space, devices, SocketSink(sock), chunk_size or DEFAULT_CHUNK, progress, phase="send"
            )
        except (PeerAnswered, BrokenPipeError, ConnectionResetError) as exc:
            # The destination refused the stream and (probably) said why: report that.
            sock.settimeout(timeout)
            try:
                error = recv_status(sock)
            except (MigrationError, OSError):
                error = None
            if error is not None:
                raise MigrationError(f"the destination refused the migration: {error}") from exc
            raise
        except TimeoutError:
            raise MigrationError(
                f"the destination read nothing for {io_timeout:g} s; migration abandoned"
            ) from None
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.EBADF, errno.ENOTCONN, errno.ESHUTDOWN):
                raise MigrationError(f"migration cancelled or connection lost: {exc.strerror}") from None
            raise
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        error = recv_status(sock)
    if error is not None:
        raise MigrationError(f"the destination refused the migration: {error}")
    return stats


def receive_from(
    listen_socket: socket.socket,
    address_space: AddressSpace,
    devices: Sequence[VirtioMem],
    *,
    progress: ProgressFn | None = None,
    accept_timeout: float | None = None,
    read_timeout: float = IO_TIMEOUT,
) -> MigrationStats:
    """Accept one connection on ``listen_socket`` and load the stream it carries.

    ``accept_timeout`` bounds the wait for the source (None: forever), ``read_timeout``
    every read after that. The source is told the outcome. Raises MigrationError
    (destination reset to all discarded, see :func:`ramdiscard.migration.load`) when the
    stream is refused or the source falls silent; TimeoutError when nobody connected.
    """
    listen_socket.settimeout(accept_timeout)
    conn, _peer = listen_socket.accept()
    with conn:
        conn.settimeout(read_timeout)
        tune_socket(conn)
        try:
            stats = load_from_reader(address_space, devices, SocketReader(conn), None, progress, "receive")
        except Exception as exc:
            try:
                send_status(conn, str(exc) or type(exc).__name__)
                if not isinstance(exc, ReadTimeout):  # a silent source has nothing to drain
                    drain_peer(conn)
            except OSError:
                pass
            raise
        send_status(conn, None)
    return stats


def drain_peer(sock: socket.socket, limit: float = 5.0) -> None:
    """Read and drop what the source still sends until it closes (or ``limit`` seconds):
    closing with unread data would reset the connection and lose our status message."""
    sock.shutdown(socket.SHUT_WR)
    sock.settimeout(limit)
    buf = bytearray(1 << 16)
    try:
        while True:
            faults.checkpoint(Op.SOCK_RECV)
            if not sock.recv_into(buf):
                break
    except OSError:
        pass


def tune_socket(sock: socket.socket) -> None:
    """4 MiB socket buffers each way (best effort): fewer wake-ups per GiB sent."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
