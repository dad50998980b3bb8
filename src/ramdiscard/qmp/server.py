"""The asyncio QMP server: sockets, clients, the worker thread and event delivery.

Rules:

* ``unix:PATH`` sockets are bound under a temporary name beside PATH, chmod'ed to 0600,
  put in listen state and only then renamed to PATH: no client can connect while the file
  is more open, and once PATH exists a connect succeeds (no window between bind and
  listen). A stale socket file (nobody listening) is replaced; a live one, or a path that
  is not a socket, is an error. The file is removed at close.
* ``tcp:HOST:PORT`` binds HOST (QMP has no authentication: use a loopback address);
  port 0 picks a free port, see :attr:`QmpServer.address`.
* Each client gets the greeting, then its commands run in order, one at a time (QEMU's
  monitor without out-of-band). All commands of all clients run on a single worker
  thread, so the backend sees one command at a time and the event loop never blocks on a
  long plug or dump; a migration (``CommandDispatcher.background``) runs on a thread of
  its own, so a stuck peer never holds the worker.
* A client's bad input gets error replies (protocol.py) and never affects other clients
  or the server. Limits (documented in docs/qmp.md): a message is at most
  ``max_message`` bytes (:data:`DEFAULT_MAX_MESSAGE`); a client that stops reading is
  disconnected once ``max_output`` bytes (:data:`DEFAULT_MAX_OUTPUT`) wait for it, and the
  replies to what it already sent are not even produced; while a client's output waits
  its input is not read. At most ``max_clients`` (:data:`DEFAULT_MAX_CLIENTS`)
  connections: a new one beyond that drops the oldest *offender* (a client that got an
  error reply or has output waiting), else the oldest client that has not negotiated
  capabilities; when every client is negotiated and well behaved the new connection is
  closed at once. So memory and descriptors stay bounded by these numbers whatever
  clients do, and a fresh client is greeted even while others flood the server.
* Size-change notifications may come from any thread; they are timestamped there and
  handed to the loop, rate limited (events.py), and delivered to negotiated clients.
* Events a command raises (RESET, STOP, RESUME, SHUTDOWN, DUMP_COMPLETED) reach every
  negotiated client before that command's reply, as with QEMU: they are handed to the
  loop from the worker thread before the command's result is.
* ``quit``: SHUTDOWN is sent to every negotiated client (the quitting one included),
  then the reply is written and flushed, every connection is closed, the listener
  stops, the socket file goes, a detached dump is waited for and the backend is closed
  on the worker thread; then :meth:`QmpServer.wait_closed` returns.
  :meth:`QmpServer.close` does the same without the event (it is idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from ramdiscard.qmp.backend import QmpBackend
from ramdiscard.qmp.commands import CommandDispatcher
from ramdiscard.qmp.events import DEFAULT_RATES, EventThrottle, QmpEvent, size_change_event
from ramdiscard.qmp.protocol import DEFAULT_MAX_MESSAGE, Execute, Item, QmpConnection, QmpError, Reply
from ramdiscard.qmp.qom import PERIPHERAL, QEMU_VERSION

log = logging.getLogger("ramdiscard.qmp")

QEMU_COMPAT: Final = QEMU_VERSION
"""The QEMU release whose QMP behaviour this server matches (reported by query-version)."""
READ_CHUNK: Final = 64 * 1024
FEED_SLICE: Final = 4096
DEFAULT_MAX_OUTPUT: Final = 1 << 20
DEFAULT_MAX_CLIENTS: Final = 64


def version_info() -> dict[str, Any]:
    from ramdiscard import __version__

    major, minor, micro = QEMU_COMPAT
    return {"qemu": {"micro": micro, "minor": minor, "major": major}, "package": f"ramdiscard {__version__}"}


@dataclass(frozen=True)
class Address:
    """A parsed ``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse a QMP listen address. Raises ValueError with the accepted forms."""
    kind, sep, rest = text.partition(":")
    if sep and kind == "unix" and rest:
        return Address("unix", path=rest)
    if sep and kind == "tcp":
        host, sep2, port = rest.rpartition(":")
        host = host.strip("[]")
        if sep2 and host and port.isdigit() and int(port) <= 65535:
            return Address("tcp", host=host, port=int(port))
    raise ValueError(f"invalid QMP address {text!r}: expected unix:PATH or tcp:HOST:PORT")


_SUN_PATH_MAX = 108
"""Bytes of ``sockaddr_un.sun_path`` on Linux, the terminating NUL included."""


def bind_unix(path: str, backlog: int = 16) -> socket.socket:
    """A listening unix socket at ``path`` with mode 0600 (see the module rules)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise FileExistsError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: a server is already listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = os.path.join(os.path.dirname(path) or ".", f".qmp-{os.getpid()}-{secrets.token_hex(4)}")
    if len(os.fsencode(staging)) >= _SUN_PATH_MAX:
        staging = path  # no room for a longer name: bind in place (a connect may be refused until listen)
    try:
        sock.bind(staging)
        try:
            os.chmod(staging, 0o600)
            sock.listen(backlog)
            if staging != path:
                os.rename(staging, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(staging)
            raise
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class _Client:
    def __init__(self, conn: QmpConnection, writer: asyncio.StreamWriter) -> None:
        self.conn = conn
        self.writer = writer
        self.peer = str(writer.get_extra_info("peername") or "unix")
        self.errors = 0

    @property
    def offender(self) -> bool:
        """Got an error reply, or does not read what it was sent."""
        return self.errors > 0 or self.writer.transport.get_write_buffer_size() > 0

    def send(self, data: bytes, max_output: int) -> None:
        if self.writer.is_closing():
            return
        if self.writer.transport.get_write_buffer_size() + len(data) > max_output:
            log.warning("QMP client %s does not read its output; disconnecting it", self.peer)
            self.writer.transport.abort()  # close() would wait for the unread output
            return
        self.writer.write(data)


class QmpServer:
    """Serves QMP for ``backend`` on ``address`` (``unix:PATH``/``tcp:HOST:PORT``)."""

    def __init__(
        self,
        backend: QmpBackend,
        address: str | Address,
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_output: int = DEFAULT_MAX_OUTPUT,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        rates: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._address = parse_address(address) if isinstance(address, str) else address
        self._version = version_info()
        self._dispatcher = CommandDispatcher(backend, self._version, emit=self._emit)
        self._max_message = max_message
        self._max_output = max_output
        self._max_clients = max_clients
        self._clock = clock
        self._throttle = EventThrottle(clock, DEFAULT_RATES if rates is None else rates)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qmp-worker")
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="qmp-migration")
        self._clients: dict[_Client, asyncio.Task[None]] = {}
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None
        self._quit_task: asyncio.Future[None] | None = None
        self._socket_path: str | None = None
        self._socket_ino: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The bound address (with the real port for ``tcp:HOST:0``)."""
        if self._address.kind == "tcp" and self._server is not None and self._server.sockets:
            return Address("tcp", host=self._address.host, port=self._server.sockets[0].getsockname()[1])
        return self._address

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def start(self) -> None:
        """Bind and start accepting. Raises OSError when the address cannot be used."""
        if self._server is not None:
            raise RuntimeError("the QMP server is already started")
        self._loop = asyncio.get_running_loop()
        if self._address.kind == "unix":
            sock = bind_unix(self._address.path)
            self._socket_path = self._address.path
            self._socket_ino = os.stat(self._address.path).st_ino
            self._server = await asyncio.start_unix_server(self._handle, sock=sock)
        else:
            self._server = await asyncio.start_server(self._handle, self._address.host, self._address.port)
        self._unsubscribe = self._backend.add_size_change_listener(self._size_changed)
        set_sink = getattr(self._backend, "set_event_sink", None)
        if callable(set_sink):
            set_sink(self.emit)
        log.info("QMP listening on %s", self.address)

    async def wait_closed(self) -> None:
        """Return once the server has shut down (after ``quit`` or :meth:`close`)."""
        await self._closed.wait()

    async def serve_forever(self) -> None:
        await self.start()
        await self.wait_closed()

    async def close(self, *, event: QmpEvent | None = None) -> None:
        """Shut down (see the module rules); ``event`` is sent to clients first."""
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._shutdown(event))
        await asyncio.shield(self._close_task)

    async def _shutdown(self, event: QmpEvent | None) -> None:
        self._closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._server is not None:
            self._server.close()
        if event is not None:
            self._deliver([event])
        current = asyncio.current_task()
        for client, task in list(self._clients.items()):
            client.writer.close()
            if task is not current:
                task.cancel()
        for task in list(self._clients.values()):
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
        self._remove_socket()
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._dispatcher.wait_dump, 60.0)
            await loop.run_in_executor(self._executor, self._backend.close)
        except Exception:
            log.exception("closing the QMP backend failed")
        finally:
            self._executor.shutdown(wait=False)
            self._background.shutdown(wait=False)
            self._closed.set()

    def _remove_socket(self) -> None:
        path, self._socket_path = self._socket_path, None
        if path is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == self._socket_ino:
                os.unlink(path)

    # -- clients ----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if self._closing or task is None:
            writer.close()
            return
        if len(self._clients) >= self._max_clients and not self._evict():
            log.warning("QMP: %d clients connected, all well behaved; refusing a new one", len(self._clients))
            writer.close()
            return
        client = _Client(QmpConnection(self._version, max_message=self._max_message), writer)
        self._clients[client] = task
        try:
            client.send(client.conn.greeting(), self._max_output)
            await self._serve_client(client, reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly (asyncio logs a cancelled client task).
            pass
        finally:
            self._clients.pop(client, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _evict(self) -> bool:
        """Drop the oldest offender, else the oldest un-negotiated client (dicts keep
        insertion order: oldest first). False when there is none."""
        clients = [c for c in self._clients if not c.writer.is_closing()]
        victim = next((c for c in clients if c.offender), None) or next(
            (c for c in clients if not c.conn.negotiated), None
        )
        if victim is None:
            return False
        log.warning("QMP: too many clients; dropping %s", victim.peer)
        victim.writer.transport.abort()
        task = self._clients.pop(victim, None)
        if task is not None:
            task.cancel()
        return True

    async def _serve_client(self, client: _Client, reader: asyncio.StreamReader) -> None:
        while not self._closing and not client.writer.is_closing():
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            async for item in self._items(client, data):
                if isinstance(item, Reply):
                    client.errors += b'"error"' in item.data[:16]
                    client.send(item.data, self._max_output)
                    continue
                reply, quit_ = await self._run(client.conn, item)
                client.send(reply, self._max_output)
                if quit_:
                    with contextlib.suppress(ConnectionError):
                        await client.writer.drain()
                    self._quit_task = asyncio.ensure_future(self.close())
                    return
            await client.writer.drain()

    @staticmethod
    async def _items(client: _Client, data: bytes) -> AsyncIterator[Item]:
        """The client's items, parsed a slice at a time with a turn of the event loop in
        between (a flood of junk from many clients cannot starve accepting and greeting a
        new one); once the client is dropped the rest of its input is not even parsed."""
        for pos in range(0, len(data), FEED_SLICE):
            if pos:
                await asyncio.sleep(0)
            if client.writer.is_closing():
                return
            for item in client.conn.receive_data(data[pos : pos + FEED_SLICE]):
                if client.writer.is_closing():
                    return
                yield item

    async def _run(self, conn: QmpConnection, req: Execute) -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        executor = self._background if req.name in self._dispatcher.background else self._executor
        try:
            outcome = await loop.run_in_executor(executor, self._dispatcher.execute, req.name, req.arguments)
        except QmpError as exc:
            return conn.error_bytes(req, exc), False
        except RuntimeError as exc:  # the executor is shut down: we are closing
            return conn.error_bytes(req, QmpError(f"the machine is shutting down: {exc}")), False
        return conn.return_bytes(req, outcome.value), outcome.quit

    # -- events -------------------------------------------------------------------------------

    def _emit(self, event: QmpEvent) -> None:
        """A command's event, from any thread: delivered on the loop, in call order."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._deliver, [event])

    def emit(self, event: QmpEvent) -> None:
        """Deliver ``event`` to every client (unthrottled); callable from any thread."""
        loop = self._loop
        if loop is None or self._closing:
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(lambda: None if self._closing else self._deliver([event]))

    def _size_changed(self, device_id: str, size: int) -> None:
        """Backend callback, from any thread."""
        stamp = time.time()
        loop = self._loop
        if loop is None or self._closing:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(self._raise_size_change, device_id, size, stamp)

    def _raise_size_change(self, device_id: str, size: int, stamp: float) -> None:
        if self._closing:
            return
        event = size_change_event(device_id, size, f"{PERIPHERAL}/{device_id}", timestamp=stamp)
        self._deliver(self._throttle.submit(event))
        self._arm_timer()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self._throttle.next_deadline()
        if deadline is None or self._loop is None or self._closing:
            return
        self._timer = self._loop.call_later(max(0.0, deadline - self._clock()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._deliver(self._throttle.expire())
        self._arm_timer()

    def _deliver(self, events: list[QmpEvent]) -> None:
        for event in events:
            message = event.to_json()
            for client in list(self._clients):
                data = client.conn.event_bytes(message)
                if data is not None:
                    client.send(data, self._max_output)
