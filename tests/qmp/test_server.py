"""The server driven by QEMU's own client library (qemu.qmp) and by raw sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from ramdiscard.qmp import QmpServer
from ramdiscard.qmp.server import bind_unix, parse_address
from ramdiscard.units import MiB
from tests.qmp.conftest import DeviceSetBackend, run_with_server

SIZE_CHANGE = "MEMORY_DEVICE_SIZE_CHANGE"


async def client(path: str | tuple[str, int], name: str = "test") -> QMPClient:
    qmp = QMPClient(name)
    await qmp.connect(path)
    return qmp


async def wait_size(listener: EventListener, dev: str, size: int) -> list[dict[str, Any]]:
    """Events for ``dev`` until one reports ``size``."""
    seen: list[dict[str, Any]] = []
    while True:
        msg = await listener.get()
        if msg["data"]["id"] == dev:
            seen.append(dict(msg))
            if msg["data"]["size"] == size:
                return seen


def test_resize_via_qom_set_and_wait_for_the_event(backend: DeviceSetBackend, sock_path: str) -> None:
    async def main(server: QmpServer) -> None:
        qmp = await client(sock_path)
        assert qmp.greeting is not None
        assert qmp.greeting.QMP.version["package"].startswith("ramdiscard ")
        version = await qmp.execute("query-version")
        assert version["package"].startswith("ramdiscard ")
        listener = EventListener(SIZE_CHANGE)
        with qmp.listen(listener):
            path = "/machine/peripheral/vm0"
            assert (
                await qmp.execute("qom-set", {"path": path, "property": "requested-size", "value": 32 * MiB})
                == {}
            )
            events = await wait_size(listener, "vm0", 32 * MiB)
        first = events[0]
        # The guest plugs one block per request and nothing was plugged: the first event,
        # never rate limited, reports the first block.
        assert first["data"] == {"id": "vm0", "size": 2 * MiB, "qom-path": path}
        sizes = [e["data"]["size"] for e in events]
        assert sizes == sorted(set(sizes)) and sizes[-1] == 32 * MiB
        assert set(first["timestamp"]) == {"seconds", "microseconds"}
        # 16 plugs, rate limited to the first and the last (or a few, if the guest is slow).
        assert len(events) < 16
        devs = await qmp.execute("query-memory-devices")
        data = devs[0]["data"]
        assert devs[0]["type"] == "virtio-mem"
        assert (data["id"], data["size"], data["requested-size"], data["max-size"]) == (
            "vm0",
            32 * MiB,
            32 * MiB,
            64 * MiB,
        )
        assert await qmp.execute("qom-get", {"path": "vm0", "property": "size"}) == 32 * MiB
        status = await qmp.execute("x-ramdiscard-status")
        assert status["plugged"] == 32 * MiB
        await qmp.disconnect()

    run_with_server(backend, f"unix:{sock_path}", main)
    assert backend.closed == 1


def test_errors_reach_the_client_with_qemu_classes(backend: DeviceSetBackend, sock_path: str) -> None:
    async def main(server: QmpServer) -> None:
        qmp = await client(sock_path)
        cases = [
            ("qom-set", {"path": "vm0", "property": "requested-size", "value": 3 * MiB},
             "GenericError", "'requested-size' has to be multiples of 'block-size' (0x200000)"),
            ("qom-set", {"path": "vm0", "property": "requested-size", "value": 128 * MiB},
             "GenericError", "'requested-size' cannot exceed the memory backend size(0x4000000)"),
            ("qom-set", {"path": "vm0", "property": "requested-size", "value": "1G"},
             "GenericError", "Parameter 'requested-size' expects uint64"),
            ("qom-get", {"path": "vm0", "property": "bogus"},
             "GenericError", "Property 'virtio-mem-pci.bogus' not found"),
            ("qom-get", {"path": "/machine/peripheral/vm9", "property": "size"},
             "DeviceNotFound", "Device '/machine/peripheral/vm9' not found"),
            ("no-such", None, "CommandNotFound", "The command no-such has not been found"),
        ]  # fmt: skip
        for name, args, cls, desc in cases:
            with pytest.raises(ExecuteError) as info:
                await qmp.execute(name, args)
            assert (info.value.error_class, str(info.value)) == (cls, desc)
        # The session is still fine afterwards.
        assert await qmp.execute("qom-get", {"path": "vm0", "property": "requested-size"}) == 0
        await qmp.disconnect()

    run_with_server(backend, f"unix:{sock_path}", main)


def test_three_clients_at_once_all_see_the_events(backend: DeviceSetBackend, sock_path: str) -> None:
    async def main(server: QmpServer) -> None:
        clients = [await client(sock_path, f"c{i}") for i in range(3)]
        listeners = [EventListener(SIZE_CHANGE) for _ in clients]
        for qmp, listener in zip(clients, listeners, strict=True):
            qmp.register_listener(listener)
        assert server.clients == 3

        async def work(i: int, qmp: QMPClient) -> list[Any]:
            return [await qmp.execute("query-memory-devices") for _ in range(20)]

        results = await asyncio.gather(*(work(i, q) for i, q in enumerate(clients)))
        assert all(len(r) == 20 for r in results)
        await clients[1].execute("qom-set", {"path": "vm1", "property": "requested-size", "value": 8 * MiB})
        for listener in listeners:
            await wait_size(listener, "vm1", 8 * MiB)
        for qmp in clients:
            await qmp.disconnect()

    run_with_server(backend, f"unix:{sock_path}", main)


async def raw_session(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path, limit=4 << 20)
    greeting = json.loads(await reader.readline())
    assert greeting["QMP"]["capabilities"] == []
    return reader, writer


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> dict[str, Any]:
    writer.write(data)
    await writer.drain()
    line = await reader.readline()
    assert line.endswith(b"\r\n"), line
    msg: dict[str, Any] = json.loads(line)
    return msg


def test_garbage_never_hurts_the_server_or_other_clients(backend: DeviceSetBackend, sock_path: str) -> None:
    good = b'{"execute": "qom-get", "arguments": {"path": "vm0", "property": "block-size"}, "id": "g"}'

    async def main(server: QmpServer) -> None:
        reader, writer = await raw_session(sock_path)
        other = await client(sock_path, "bystander")
        before = await exchange(reader, writer, b'{"execute": "query-version"}')
        assert before["error"]["class"] == "CommandNotFound"
        assert before["error"]["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'"
        assert await exchange(reader, writer, b'{"execute": "qmp_capabilities"}') == {"return": {}}
        bad_inputs = [
            (b'{"execute": "qom-get", "arguments": {"path": }}', "JSON parse error, "),
            (
                b'{"execute": "x", "arguments": {"s": "' + b"A" * (2 << 20) + b'"}}',
                "JSON token size limit exceeded",
            ),
            (b"\x00\x01\x02 garbage\xfe", "JSON parse error, stray '\\x00'"),
            (b"[1, 2, 3]", "QMP input must be a JSON object"),
            (b'"hello"', "QMP input must be a JSON object"),
            (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        ]
        for data, prefix in bad_inputs:
            reply = await exchange(reader, writer, data)
            assert reply["error"]["class"] == "GenericError"
            assert reply["error"]["desc"].startswith(prefix), reply
            assert "id" not in reply
            assert await exchange(reader, writer, good) == {"return": 2 * MiB, "id": "g"}
            assert await other.execute("qom-get", {"path": "vm0", "property": "block-size"}) == 2 * MiB
        writer.write(os.urandom(4096) + b"\xff")  # random junk, then a reset
        await writer.drain()
        writer.write(b'{"execute": "query-status", "id": "after-junk"}')
        await writer.drain()
        while True:  # error replies for the junk come first
            reply = json.loads(await reader.readline())
            if reply.get("id") == "after-junk":
                break
            assert reply["error"]["class"] in ("GenericError", "CommandNotFound"), reply
        assert reply == {"return": {"status": "running", "running": True}, "id": "after-junk"}
        writer.close()
        await other.disconnect()

    run_with_server(backend, f"unix:{sock_path}", main)


def test_unix_socket_is_0600_and_removed_at_close(backend: DeviceSetBackend, sock_path: str) -> None:
    async def main(server: QmpServer) -> None:
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        with pytest.raises(OSError, match="already listening"):
            bind_unix(sock_path)

    old = os.umask(0o000)  # even a wide-open umask gives 0600
    try:
        run_with_server(backend, f"unix:{sock_path}", main)
    finally:
        os.umask(old)
    assert not os.path.exists(sock_path)


def test_stale_socket_is_replaced_and_a_regular_file_is_refused(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens
    sock = bind_unix(sock_path)
    sock.close()
    os.unlink(sock_path)
    with open(sock_path, "w") as f:
        f.write("not a socket")
    with pytest.raises(FileExistsError):
        bind_unix(sock_path)


def test_quit_replies_then_closes_everything(backend: DeviceSetBackend, sock_path: str) -> None:
    async def main(server: QmpServer) -> None:
        watcher = await client(sock_path, "watcher")
        down = EventListener("SHUTDOWN")
        watcher.register_listener(down)
        qmp = await client(sock_path)
        assert await qmp.execute("quit") == {}
        event = await down.get()
        assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
        await asyncio.wait_for(server.wait_closed(), 10)
        assert backend.closed == 1 and not backend.devs
        assert not os.path.exists(sock_path)
        # The server hung up, as QEMU does after quit: qemu.qmp reports it at disconnect.
        for c in (qmp, watcher):
            with contextlib.suppress(EOFError):
                await c.disconnect()

    run_with_server(backend, f"unix:{sock_path}", main)


def test_tcp_on_loopback(backend: DeviceSetBackend) -> None:
    async def main(server: QmpServer) -> None:
        addr = server.address
        assert addr.kind == "tcp" and addr.port > 0
        qmp = await client((addr.host, addr.port))
        assert await qmp.execute("qom-get", {"path": "vm1", "property": "requested-size"}) == 0
        await qmp.disconnect()

    run_with_server(backend, "tcp:127.0.0.1:0", main)


def test_address_parsing() -> None:
    assert str(parse_address("unix:/run/x.sock")) == "unix:/run/x.sock"
    assert parse_address("tcp:127.0.0.1:4444").port == 4444
    assert parse_address("tcp:[::1]:4444").host == "::1"
    for bad in ("x.sock", "unix:", "tcp:127.0.0.1", "tcp::4444", "tcp:h:99999", "udp:h:1"):
        with pytest.raises(ValueError, match="expected unix:PATH or tcp:HOST:PORT"):
            parse_address(bad)
