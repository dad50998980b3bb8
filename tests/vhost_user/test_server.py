"""VhostUserServer over a real UNIX socket with a scripted frontend (SCM_RIGHTS, eventfds)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ramdiscard.interfaces import Virtqueue
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.providers.virtio_mem.wire import Request as MemRequest
from ramdiscard.providers.virtio_mem.wire import RequestType, Response, ResponseType
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB
from ramdiscard.vhost_user import wire
from ramdiscard.vhost_user.memtable import MemoryTable
from ramdiscard.vhost_user.server import OFFERED_PROTOCOL, VhostUserServer
from ramdiscard.vhost_user.wire import MemRegion, Request

from .conftest import AVAIL, DESC, GPA_BASE, MEM_SIZE, NUM, USED, UVA_BASE, Driver

ADDR = 1 << 32


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Frontend:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)

    def send(self, request: int, payload: bytes = b"", fds: list[int] | None = None, flags: int = 1) -> None:
        socket.send_fds(self.sock, [wire.encode(request, payload, flags=flags)], fds or [])

    def reply(self) -> bytes:
        header = self.sock.recv(12, socket.MSG_WAITALL)
        _r, flags, size = struct.unpack("<III", header)
        assert flags & wire.FLAG_REPLY
        return self.sock.recv(size, socket.MSG_WAITALL) if size else b""

    def call(self, request: int, payload: bytes = b"") -> bytes:
        self.send(request, payload)
        return self.reply()


@pytest.fixture
def device() -> Iterator[VirtioMem]:
    dev = VirtioMem(MemoryRegion.new_ram("vhost-srv-mem", 64 * MiB), addr=ADDR, block_size=2 * MiB,
                    requested_size=16 * MiB, policy=DiscardPolicy())  # fmt: skip
    yield dev
    dev.unrealize()


@pytest.fixture
def server(tmp_path: Path, device: VirtioMem) -> Iterator[VhostUserServer]:
    srv = VhostUserServer(str(tmp_path / "vu.sock"), device, on_disconnect=lambda: device.system_reset())
    srv.start()
    yield srv
    srv.close()


def setup_frontend(server: VhostUserServer, memory: MemoryTable) -> tuple[Frontend, int, int, socket.socket]:
    fe = Frontend(server.path)
    features = struct.unpack("<Q", fe.call(Request.GET_FEATURES))[0]
    assert features & wire.F_PROTOCOL_FEATURES and features & (1 << 32)
    assert struct.unpack("<Q", fe.call(Request.GET_PROTOCOL_FEATURES))[0] == OFFERED_PROTOCOL
    fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", OFFERED_PROTOCOL))
    fe.send(Request.SET_OWNER)
    ours, theirs = socket.socketpair()
    fe.send(Request.SET_BACKEND_REQ_FD, b"", [theirs.fileno()])
    theirs.close()
    fd = memory.regions[0].fd
    table = wire.encode_mem_table([MemRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)])
    fe.send(Request.SET_MEM_TABLE, table, [fd], flags=1 | wire.FLAG_NEED_REPLY)
    assert struct.unpack("<Q", fe.reply())[0] == 0
    fe.send(Request.SET_FEATURES, struct.pack("<Q", (1 << 32) | 2))
    fe.send(Request.SET_VRING_NUM, struct.pack("<II", 0, NUM))
    uva = UVA_BASE - GPA_BASE
    fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, uva + DESC, uva + USED, uva + AVAIL, 0))
    fe.send(Request.SET_VRING_BASE, struct.pack("<II", 0, 0))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    call = os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
    fe.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), [call])
    fe.send(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
    return fe, kick, call, ours


def test_plug_through_the_ring_and_config_change(
    server: VhostUserServer, device: VirtioMem, memory: MemoryTable, driver: Driver
) -> None:
    served: list[Virtqueue] = []

    def through(vq: Virtqueue) -> Virtqueue:
        served.append(vq)
        return vq

    server.wrap_queue = through
    fe, kick, call, backend = setup_frontend(server, memory)
    try:
        cfg = fe.call(Request.GET_CONFIG, struct.pack("<III", 0, 56, 0) + bytes(56))
        assert cfg[12:] == device.config_bytes()
        os.eventfd_write(kick, 1)  # builds the ring with the first call descriptor
        wait_for(lambda: server.ring_location() is not None, "the ring")
        os.close(call)
        call = os.eventfd(0, os.EFD_NONBLOCK)  # QEMU replaces it after enabling the ring
        # Acked before the next kick: otherwise the server may serve that kick before it
        # reads this message and signal the descriptor being replaced.
        fe.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), [call], flags=1 | wire.FLAG_NEED_REPLY)
        assert struct.unpack("<Q", fe.reply())[0] == 0
        inb = driver.add(0, MemRequest(RequestType.PLUG, ADDR, 4).pack(), 10)
        os.eventfd_write(kick, 1)
        wait_for(lambda: device.plugged_size == 8 * MiB, "the plug")
        assert Response.parse(memory.read(inb, 10)).type is ResponseType.ACK
        assert served and all(vq is served[0] for vq in served)  # every kick, through the wrapper
        wait_for(lambda: _readable(call), "the call eventfd")
        device.requested_size = 32 * MiB
        assert server.config_changed()
        backend.settimeout(5)
        request, _flags, size = struct.unpack("<III", backend.recv(12))
        assert (request, size) == (wire.BackendRequest.CONFIG_CHANGE_MSG, 0)
        base = struct.unpack("<II", fe.call(Request.GET_VRING_BASE, struct.pack("<II", 0, 0)))
        assert base == (0, 1)
    finally:
        fe.sock.close()
        backend.close()
        os.close(kick)
        os.close(call)
    wait_for(lambda: not server.connected, "the disconnect")
    assert device.plugged_size == 0 and server.dropped[-1] == "frontend closed the connection"


def _readable(fd: int) -> bool:
    try:
        return os.eventfd_read(fd) > 0
    except BlockingIOError:
        return False


def test_malformed_message_drops_connection_and_next_frontend_is_served(
    server: VhostUserServer, device: VirtioMem
) -> None:
    before = len(os.listdir("/proc/self/fd"))
    bad = Frontend(server.path)
    r, w = os.pipe()
    bad.sock.sendall(struct.pack("<III", Request.GET_FEATURES, 0x5, 0))  # version 1 | reply bit: ok
    socket.send_fds(bad.sock, [struct.pack("<III", 1, 0x2, 0)], [r])  # version 2: refused
    os.close(r)
    os.close(w)
    bad.sock.settimeout(10)
    data = b""
    while chunk := bad.sock.recv(4096):
        data += chunk
    bad.sock.close()
    wait_for(lambda: not server.connected, "the drop")
    assert "version" in server.dropped[-1]
    good = Frontend(server.path)
    assert struct.unpack("<Q", good.call(Request.GET_PROTOCOL_FEATURES))[0] == OFFERED_PROTOCOL
    good.sock.close()
    wait_for(lambda: not server.connected and server.connections == 2, "the second session to end")
    wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before, "descriptors to be closed")


def test_ring_outside_memory_breaks_device_not_server(
    server: VhostUserServer, device: VirtioMem, memory: MemoryTable
) -> None:
    fe = Frontend(server.path)
    try:
        fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", OFFERED_PROTOCOL))
        table = wire.encode_mem_table([MemRegion(GPA_BASE, MEM_SIZE, UVA_BASE, 0)])
        fe.send(Request.SET_MEM_TABLE, table, [memory.regions[0].fd])
        fe.send(Request.SET_VRING_NUM, struct.pack("<II", 0, NUM))
        fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 16, 0x1000, 0x2000, 0))
        kick = os.eventfd(0)
        fe.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
        os.close(kick)
        fe.send(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        wait_for(lambda: device.broken, "the device to break")
        assert struct.unpack("<Q", fe.call(Request.GET_QUEUE_NUM))[0] == 1
        assert device.plugged_size == 0
    finally:
        fe.sock.close()
    _ = threading.active_count()
