"""vhost-user backend server: one frontend (QEMU) over a UNIX socket.

Rules:

* :class:`VhostUserServer` listens on ``path`` and serves one frontend at a time on its
  own thread (:meth:`~VhostUserServer.start` / :meth:`~VhostUserServer.close`). A second
  frontend waits until the first is gone. Device work (requests, config reads) runs under
  ``lock`` (shared with the control plane).
* Messages are decoded by :mod:`.wire`. A malformed message (WireError), a memory table
  that cannot be mapped without NEED_REPLY, or a socket error drops the connection; every
  descriptor received and not kept is closed. A frontend that vanishes (EOF, reset) is a
  powered-off machine: its memory table is unmapped, its eventfds and backend channel
  closed, and ``on_disconnect`` runs (the launcher unplugs everything). Then the server
  accepts the next frontend. Nothing leaks across connections.
* Negotiated: virtio features of the device | VERSION_1 | PROTOCOL_FEATURES; protocol
  features REPLY_ACK | BACKEND_REQ | CONFIG. With REPLY_ACK and NEED_REPLY, a request
  without a reply of its own is answered u64 0 (done) or 1 (refused).
* Ring 0 is served when its size, addresses, memory table and kick descriptor are known
  and it is enabled: every kick runs ``device.process_queue`` on the :class:`SplitRing`.
  A ring that cannot be built (addresses outside memory) or a protocol violation breaks
  the device (``device.protocol_violation``), never the server. GET_VRING_BASE stops the
  ring and reports its position.
* :meth:`VhostUserServer.config_changed` sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG on the
  backend channel (when the frontend gave one); callable from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ramdiscard.errors import RamDiscardError
from ramdiscard.interfaces import Virtqueue
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.vhost_user import wire
from ramdiscard.vhost_user.memtable import MemoryTable
from ramdiscard.vhost_user.split_ring import SplitRing
from ramdiscard.vhost_user.wire import Message, ProtocolFeature, Request, WireError

log = logging.getLogger("ramdiscard.vhost_user")

VIRTIO_F_VERSION_1 = 1 << 32
DEVICE_FEATURE_MASK = (1 << 24) - 1
OFFERED_PROTOCOL = wire.protocol_features(
    ProtocolFeature.REPLY_ACK, ProtocolFeature.BACKEND_REQ, ProtocolFeature.CONFIG
)
RECV_CHUNK = 4096


@dataclass
class _Vring:
    num: int = 0
    addr: wire.VringAddr | None = None
    base: int = 0
    kick: int | None = None
    call: int | None = None
    err: int | None = None
    enabled: bool = False
    ring: SplitRing | None = None


@dataclass
class _Session:
    conn: socket.socket
    decoder: wire.MessageDecoder = field(default_factory=wire.MessageDecoder)
    features: int = 0
    protocol: int = 0
    owner: bool = False
    memory: MemoryTable | None = None
    memory_fds: tuple[int, ...] = ()
    vring: _Vring = field(default_factory=_Vring)
    backend: socket.socket | None = None


class VhostUserServer:
    """Serves ``device`` to one vhost-user frontend at a time; see the module rules.

    ``config`` returns the device's config space bytes; ``on_disconnect`` runs (under
    ``lock``) after a frontend is gone; ``on_message`` sees each request's name (tracing);
    ``wrap_queue`` (tracing) gets the ring at every kick and returns the queue the device
    is served through.
    """

    def __init__(
        self,
        path: str,
        device: VirtioMem,
        *,
        lock: threading.RLock | None = None,
        on_disconnect: Callable[[], None] | None = None,
        on_message: Callable[[str], None] | None = None,
        wrap_queue: Callable[[Virtqueue], Virtqueue] | None = None,
    ) -> None:
        self.path = path
        self.wrap_queue = wrap_queue
        self.device = device
        self.lock = lock if lock is not None else threading.RLock()
        self.on_disconnect = on_disconnect
        self.on_message = on_message
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except BaseException:
            self._listener.close()
            raise
        self._wake_r, self._wake_w = os.pipe()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._session: _Session | None = None
        self._backend_lock = threading.Lock()
        self.connections = 0
        self.dropped: list[str] = []
        """Why each connection ended ("frontend closed" or the error), oldest first."""

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vhost-user", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, end the connection (``on_disconnect`` runs), remove the socket."""
        self._stop = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._session is not None:
            self._end_session("server closed")
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    @property
    def connected(self) -> bool:
        return self._session is not None

    # -- control plane -----------------------------------------------------------------------

    def config_changed(self) -> bool:
        """Tell the frontend the config changed; False when there is no backend channel."""
        with self._backend_lock:
            session = self._session
            if session is None or session.backend is None:
                return False
            try:
                session.backend.sendall(wire.encode(wire.BackendRequest.CONFIG_CHANGE_MSG))
            except OSError as exc:
                log.warning("vhost-user: config change not delivered: %s", exc)
                return False
            return True

    def poll_queue(self) -> None:
        """Serve the ring now, as a kick does (what QEMU's ioeventfd delivers when the
        guest writes the queue-notify register)."""
        session = self._session
        if session is not None and session.vring.kick is not None:
            _signal(session.vring.kick)

    def ring_location(self) -> tuple[int, int, int, int] | None:
        """(num, desc, avail, used) guest-physical addresses of the running ring."""
        session = self._session
        ring = session.vring.ring if session is not None else None
        if ring is None:
            return None
        return ring.num, ring.desc, ring.avail, ring.used

    # -- event loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        # poll(2), not select(2): no FD_SETSIZE limit on descriptor numbers.
        poller = select.poll()
        watched: dict[int, str] = {}

        def watch(fd: int, what: str) -> None:
            poller.register(fd, select.POLLIN)
            watched[fd] = what

        def unwatch(fd: int) -> None:
            poller.unregister(fd)
            del watched[fd]

        watch(self._wake_r, "wake")
        watch(self._listener.fileno(), "listen")
        while not self._stop:
            for fd, _ev in poller.poll():
                what = watched.get(fd)
                if what == "wake":
                    return
                if what == "listen":
                    conn, _addr = self._listener.accept()
                    self._session = _Session(conn)
                    self.connections += 1
                    unwatch(fd)
                    watch(conn.fileno(), "conn")
                elif what == "conn":
                    reason = self._receive()
                    if reason is not None:
                        for other, kind in list(watched.items()):
                            if kind in ("conn", "kick"):
                                unwatch(other)
                        self._end_session(reason)
                        watch(self._listener.fileno(), "listen")
                        break
                elif what == "kick":
                    with contextlib.suppress(BlockingIOError, OSError):
                        os.read(fd, 8)
                    self._serve_queue()
            want = self._session.vring.kick if self._session is not None else None
            for other, kind in list(watched.items()):
                if kind == "kick" and other != want:
                    unwatch(other)
            if want is not None and want not in watched:
                watch(want, "kick")

    def _receive(self) -> str | None:
        session = self._session
        assert session is not None
        try:
            data, fds, _flags, _addr = socket.recv_fds(session.conn, RECV_CHUNK, wire.MAX_FDS)
        except OSError as exc:
            return f"receive failed: {exc}"
        if not data:
            for fd in fds:
                os.close(fd)
            return "frontend closed the connection"
        try:
            messages = session.decoder.feed(data, fds)
        except WireError as exc:
            for fd in session.decoder.take_fds():
                os.close(fd)
            return f"malformed message: {exc}"
        for i, msg in enumerate(messages):
            try:
                self._dispatch(session, msg)
            except (WireError, OSError) as exc:
                for later in messages[i + 1 :]:
                    for fd in later.fds:
                        os.close(fd)
                return f"{msg.name()}: {exc}"
        return None

    def _end_session(self, reason: str) -> None:
        session = self._session
        if session is None:
            return
        with self._backend_lock:
            self._session = None
        log.info("vhost-user: frontend gone: %s", reason)
        self.dropped.append(reason)
        self._close_vring(session.vring)
        if session.memory is not None:
            session.memory.close()
        for fd in session.memory_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if session.backend is not None:
            session.backend.close()
        for fd in session.decoder.take_fds():
            with contextlib.suppress(OSError):
                os.close(fd)
        session.conn.close()
        if self.on_disconnect is not None:
            with self.lock:
                self.on_disconnect()

    @staticmethod
    def _close_vring(vring: _Vring) -> None:
        for fd in (vring.kick, vring.call, vring.err):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        vring.kick = vring.call = vring.err = None
        vring.ring = None
        vring.enabled = False

    # -- requests ------------------------------------------------------------------------------

    def _dispatch(self, s: _Session, msg: Message) -> None:
        if self.on_message is not None:
            self.on_message(msg.name())
        kept: set[int] = set()
        try:
            reply, ok = self._handle(s, msg, kept)
        finally:
            for fd in msg.fds:
                if fd not in kept:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if reply is not None:
            s.conn.sendall(wire.encode_reply(msg.request, reply))
        elif msg.need_reply and s.protocol & (1 << ProtocolFeature.REPLY_ACK):
            s.conn.sendall(wire.encode_reply(msg.request, wire.encode_u64(0 if ok else 1)))

    def _handle(self, s: _Session, msg: Message, kept: set[int]) -> tuple[bytes | None, bool]:
        r = msg.request
        vring = s.vring
        if r == Request.GET_FEATURES:
            features = self.device.host_features | VIRTIO_F_VERSION_1 | wire.F_PROTOCOL_FEATURES
            return wire.encode_u64(features), True
        if r == Request.SET_FEATURES:
            s.features = wire.decode_u64(msg)
            with self.lock:
                try:
                    self.device.set_driver_features(s.features & DEVICE_FEATURE_MASK)
                except RamDiscardError as exc:
                    log.warning("vhost-user: %s", exc)
            return None, True
        if r == Request.GET_PROTOCOL_FEATURES:
            return wire.encode_u64(OFFERED_PROTOCOL), True
        if r == Request.SET_PROTOCOL_FEATURES:
            s.protocol = wire.decode_u64(msg) & OFFERED_PROTOCOL
            return None, True
        if r == Request.GET_QUEUE_NUM:
            return wire.encode_u64(1), True
        if r == Request.SET_OWNER:
            s.owner = True
            return None, True
        if r in (Request.RESET_OWNER, Request.RESET_DEVICE):
            self._close_vring(vring)
            return None, True
        if r == Request.SET_MEM_TABLE:
            return None, self._set_mem_table(s, msg, kept)
        if r == Request.SET_VRING_NUM:
            state = wire.decode_vring_state(msg)
            if state.index != 0:
                return None, False
            vring.num, vring.ring = state.num, None
            return None, True
        if r == Request.SET_VRING_ADDR:
            addr = wire.decode_vring_addr(msg)
            if addr.index != 0:
                return None, False
            vring.addr, vring.ring = addr, None
            return None, True
        if r == Request.SET_VRING_BASE:
            state = wire.decode_vring_state(msg)
            if state.index != 0 or state.num > 0xFFFF:
                return None, False
            vring.base, vring.ring = state.num, None
            return None, True
        if r == Request.GET_VRING_BASE:
            state = wire.decode_vring_state(msg)
            if vring.ring is not None:
                vring.base = vring.ring.last_avail_idx
            base = vring.base
            self._close_vring(vring)
            return wire.encode_vring_state(wire.VringState(state.index, base)), True
        if r in (Request.SET_VRING_KICK, Request.SET_VRING_CALL, Request.SET_VRING_ERR):
            index, fd = wire.decode_vring_fd(msg)
            if index != 0:
                return None, False
            attr = {Request.SET_VRING_KICK: "kick", Request.SET_VRING_CALL: "call"}.get(Request(r), "err")
            old = getattr(vring, attr)
            if old is not None:
                os.close(old)
            setattr(vring, attr, fd)
            if fd is not None:
                kept.add(fd)
            if attr == "kick":
                vring.ring = None
                self._serve_queue()
            return None, True
        if r == Request.SET_VRING_ENABLE:
            state = wire.decode_vring_state(msg)
            if state.index != 0:
                return None, False
            vring.enabled = bool(state.num)
            if vring.enabled:
                self._serve_queue()
            return None, True
        if r == Request.SET_BACKEND_REQ_FD:
            if len(msg.fds) != 1:
                raise WireError(f"SET_BACKEND_REQ_FD with {len(msg.fds)} descriptors")
            with self._backend_lock:
                if s.backend is not None:
                    s.backend.close()
                s.backend = socket.socket(fileno=msg.fds[0])
            kept.add(msg.fds[0])
            return None, True
        if r == Request.GET_CONFIG:
            cfg = wire.decode_config(msg)
            with self.lock:
                space = self.device.config_bytes()
            if cfg.offset + cfg.size > len(space):
                return wire.encode_config(wire.ConfigPayload(cfg.offset, 0, cfg.flags, b"")), False
            data = space[cfg.offset : cfg.offset + cfg.size]
            return wire.encode_config(wire.ConfigPayload(cfg.offset, cfg.size, cfg.flags, data)), True
        if r == Request.SET_CONFIG:
            wire.decode_config(msg)
            return None, True  # virtio-mem's config space is read-only for the driver
        log.warning("vhost-user: unsupported %s refused", msg.name())
        return None, False

    def _set_mem_table(self, s: _Session, msg: Message, kept: set[int]) -> bool:
        regions = wire.decode_mem_table(msg)
        try:
            table = MemoryTable.from_regions(regions, msg.fds)
        except RamDiscardError as exc:
            if not msg.need_reply:
                raise WireError(str(exc)) from None
            log.warning("vhost-user: %s", exc)
            return False
        if s.memory is not None:
            s.memory.close()
        for fd in s.memory_fds:
            os.close(fd)
        s.memory, s.memory_fds = table, msg.fds
        kept.update(msg.fds)
        s.vring.ring = None
        return True

    def _serve_queue(self) -> None:
        s = self._session
        if s is None:
            return
        vring = s.vring
        if not vring.enabled or vring.kick is None or vring.addr is None or s.memory is None:
            return
        with self.lock:
            if vring.ring is None:
                try:
                    mem = s.memory
                    addr = vring.addr
                    vring.ring = SplitRing(
                        mem,
                        num=vring.num,
                        desc=mem.uva_to_gpa(addr.desc, 16 * vring.num),
                        avail=mem.uva_to_gpa(addr.avail, 6 + 2 * vring.num),
                        used=mem.uva_to_gpa(addr.used, 6 + 8 * vring.num),
                        last_avail_idx=vring.base,
                        signal=lambda: _signal(vring.call),
                    )
                except RamDiscardError as exc:
                    if not self.device.broken:
                        log.warning("vhost-user: %s", self.device.protocol_violation(f"vring setup: {exc}"))
                    return
            if self.device.broken:
                return
            try:
                ring: Virtqueue = vring.ring
                self.device.process_queue(ring if self.wrap_queue is None else self.wrap_queue(ring))
            except RamDiscardError as exc:
                log.warning("vhost-user: %s", exc)


def _signal(fd: int | None) -> None:
    """Signal an eventfd; the ring's call descriptor is looked up at signal time because
    the frontend may replace it (SET_VRING_CALL) while the ring runs."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.write(fd, struct.pack("<Q", 1))
