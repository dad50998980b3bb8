"""QEMU's run-state, memory, introspection, dump and quit commands against ``ramdiscard
serve`` (a scenario machine with its guest thread), over a raw QMP socket: the events a
command raises arrive before its reply, as QEMU sends them. No QEMU is needed; the
differential suite compares the same commands with a real QEMU where one exists."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.cli.serve import cli_main
from ramdiscard.units import MiB

pytestmark = pytest.mark.timeout(120)

BOOT = 16 * MiB
REGION = 128 * MiB
SCENARIO = f"""
name = "qmp-qemu-commands"
boot-ram = "{BOOT // MiB}M"

[[devices]]
id = "vm0"
size = "{REGION // MiB}M"
block-size = "2M"
backing = "anonymous"
"""
WAIT = 30.0


class Client:
    """A line-oriented QMP client that keeps every message in arrival order."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self.log: list[dict[str, Any]] = []
        assert "QMP" in self.read()
        assert self.command("qmp_capabilities")[-1] == {"return": {}}

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("the server closed the connection")
        msg: dict[str, Any] = json.loads(line)
        self.log.append(msg)
        return msg

    def command(self, name: str, arguments: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Send one command; every message up to and including its reply, in order."""
        request: dict[str, Any] = {"execute": name}
        if arguments is not None:
            request["arguments"] = arguments
        self.file.write(json.dumps(request).encode() + b"\n")
        self.file.flush()
        out = []
        while True:
            msg = self.read()
            out.append(msg)
            if "return" in msg or "error" in msg:
                return out

    def ok(self, name: str, arguments: dict[str, Any] | None = None) -> Any:
        reply = self.command(name, arguments)[-1]
        assert "return" in reply, (name, reply)
        return reply["return"]

    def error(self, name: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = self.command(name, arguments)[-1]
        assert "error" in reply, (name, reply)
        err: dict[str, Any] = reply["error"]
        return err

    def event(self, name: str) -> dict[str, Any]:
        """The next event ``name`` (from the log or read now), bounded by the socket timeout."""
        for i, msg in enumerate(self.log):
            if msg.get("event") == name:
                del self.log[: i + 1]
                return msg
        while True:
            msg = self.read()
            if msg.get("event") == name:
                self.log.clear()
                return msg

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def events(messages: list[dict[str, Any]]) -> list[str]:
    return [m["event"] for m in messages if "event" in m]


def poll(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture
def served(tmp_path: Path, sock_path: str) -> Iterator[str]:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    result: list[int] = []
    server = threading.Thread(
        target=lambda: result.append(cli_main([str(scenario), "--qmp", f"unix:{sock_path}"])), daemon=True
    )
    server.start()
    poll(lambda: os.path.exists(sock_path) or not server.is_alive(), "the server socket")
    assert server.is_alive(), "ramdiscard serve exited at start"
    yield sock_path
    if server.is_alive():
        try:
            closer = Client(sock_path)
        except OSError:
            pass  # the test quit: the server is already closing its socket
        else:
            closer.ok("quit")
            closer.close()
    server.join(WAIT)
    assert not server.is_alive()
    assert result == [0]


def plugged(c: Client) -> int:
    (dev,) = c.ok("query-memory-devices")
    return int(dev["data"]["size"])


def set_requested(c: Client, size: int) -> None:
    c.ok("qom-set", {"path": "vm0", "property": "requested-size", "value": size})


def test_stop_cont_and_system_reset_of_a_stopped_machine(served: str) -> None:
    c = Client(served)
    assert c.ok("query-status") == {"status": "running", "running": True}
    set_requested(c, 32 * MiB)
    poll(lambda: plugged(c) == 32 * MiB, "the guest to plug 32 MiB")

    out = c.command("stop")
    assert events(out) == ["STOP"] and out[-1] == {"return": {}}
    assert c.ok("query-status") == {"status": "paused", "running": False}
    assert events(c.command("stop")) == []  # already stopped: no second STOP

    # A reset of the stopped machine unplugs everything; the paused guest cannot re-plug.
    out = c.command("system_reset")
    assert events(out) == ["RESET"] and out[-1] == {"return": {}}
    reset = next(m for m in out if m.get("event") == "RESET")
    assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert c.ok("query-status") == {"status": "prelaunch", "running": False}
    assert plugged(c) == 0
    summary = c.ok("query-memory-size-summary")
    assert summary == {"base-memory": BOOT, "plugged-memory": 0}

    out = c.command("cont")
    assert events(out) == ["RESUME"] and out[-1] == {"return": {}}
    assert c.ok("query-status") == {"status": "running", "running": True}
    assert events(c.command("cont")) == []  # already running: no second RESUME
    poll(lambda: plugged(c) == 32 * MiB, "the rebooted guest to plug 32 MiB again")

    # A reset of the running machine: RESET, the guest re-plugs, the status stays running.
    out = c.command("system_reset")
    assert events(out) == ["RESET"]
    assert c.ok("query-status")["status"] == "running"
    poll(lambda: plugged(c) == 32 * MiB, "the guest to plug after the reset")
    c.close()


def test_memory_queries_follow_the_device(served: str) -> None:
    c = Client(served)
    set_requested(c, 48 * MiB)
    poll(lambda: plugged(c) == 48 * MiB, "the guest to plug 48 MiB")
    assert c.ok("query-memory-size-summary") == {"base-memory": BOOT, "plugged-memory": 48 * MiB}
    (dev,) = c.ok("query-memory-devices")
    memdev = dev["data"]["memdev"]
    assert memdev.startswith("/objects/")
    backends = c.ok("query-memdev")
    ids = {b["id"]: b for b in backends}
    mine = ids[memdev.removeprefix("/objects/")]
    assert mine["size"] == REGION == dev["data"]["max-size"]
    for b in backends:
        assert set(b) >= {
            "id",
            "size",
            "merge",
            "dump",
            "prealloc",
            "share",
            "reserve",
            "policy",
            "host-nodes",
        }
        assert isinstance(b["size"], int) and b["size"] > 0
        assert c.ok("qom-get", {"path": f"/objects/{b['id']}", "property": "size"}) == b["size"]
    set_requested(c, 0)
    poll(lambda: plugged(c) == 0, "the guest to unplug")
    assert c.ok("query-memory-size-summary")["plugged-memory"] == 0
    c.close()


def test_type_introspection(served: str) -> None:
    c = Client(served)
    dev_props = {p["name"]: p for p in c.ok("device-list-properties", {"typename": "virtio-mem-pci"})}
    assert {"requested-size", "block-size", "memdev", "prealloc"} <= set(dev_props)
    listed = {p["name"] for p in c.ok("qom-list-properties", {"typename": "memory-backend-ram"})}
    assert {"size", "share", "prealloc", "merge", "dump", "policy"} <= listed
    # What qom-list shows on the live device is what the type lists.
    live = {p["name"] for p in c.ok("qom-list", {"path": "vm0"})}
    assert {"requested-size", "block-size", "memdev"} <= live

    err = c.error("device-list-properties", {"typename": "no-such-device"})
    assert err == {"class": "DeviceNotFound", "desc": "Device 'no-such-device' not found"}
    err = c.error("qom-list-properties", {"typename": "no-such-type"})
    assert err == {"class": "DeviceNotFound", "desc": "Class 'no-such-type' not found"}
    assert c.error("device-list-properties", {})["desc"] == "Parameter 'typename' is missing"
    assert c.error("qom-list-properties", {"typename": 7})["class"] == "GenericError"
    names = {e["name"] for e in c.ok("query-commands")}
    assert {"system_reset", "stop", "cont", "query-memory-size-summary", "query-memdev",
            "qom-list-properties", "device-list-properties", "dump-guest-memory", "query-dump",
            "quit"} <= names  # fmt: skip
    c.close()


def _elf_loads(path: Path) -> int:
    """Number of PT_LOAD program headers of an ELF64 core."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF"
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    return sum(
        1
        for i in range(phnum)
        if int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") == 1
    )


def test_dump_guest_memory_argument_forms_and_query_dump(served: str, tmp_path: Path) -> None:
    c = Client(served)
    assert c.ok("query-dump") == {"status": "none", "completed": 0, "total": 0}
    set_requested(c, 8 * MiB)
    poll(lambda: plugged(c) == 8 * MiB, "the guest to plug 8 MiB")

    bad = tmp_path / "bad.core"
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"protocol": f"file:{bad}"}, "Parameter 'paging' is missing"),
        ({"paging": False}, "Parameter 'protocol' is missing"),
        ({"paging": "no", "protocol": f"file:{bad}"},
         "Invalid parameter type for 'paging', expected: boolean"),
        ({"paging": False, "protocol": f"tcp:{bad}"},
         "parameter 'protocol' must start with 'file:' or 'fd:'"),
        ({"paging": False, "protocol": f"file:{bad}", "begin": 0}, "Parameter 'length' is missing"),
        ({"paging": False, "protocol": f"file:{bad}", "length": 4096}, "Parameter 'begin' is missing"),
        ({"paging": True, "protocol": f"file:{bad}", "format": "kdump-zlib"},
         "kdump-compressed format doesn't support paging or filter"),
        ({"paging": False, "protocol": f"file:{bad}", "format": "tiff"},
         "Parameter 'format' does not accept value 'tiff'"),
        ({"paging": False, "protocol": f"file:{bad}", "bogus": 1}, "Parameter 'bogus' is unexpected"),
    ]  # fmt: skip
    for arguments, desc in refusals:
        out = c.command("dump-guest-memory", arguments)
        assert out[-1] == {"error": {"class": "GenericError", "desc": desc}}, arguments
        assert events(out) == []
    assert not bad.exists()
    assert c.ok("query-dump")["status"] == "none"
    assert c.ok("query-status")["status"] == "running"

    # Synchronous: the machine stops for the dump and resumes; events before the reply.
    core = tmp_path / "sync.core"
    out = c.command("dump-guest-memory", {"paging": False, "protocol": f"file:{core}"})
    assert events(out) == ["STOP", "DUMP_COMPLETED", "RESUME"] and out[-1] == {"return": {}}
    done = c.ok("query-dump")
    assert done["status"] == "completed" and done["completed"] == done["total"] > 0
    assert _elf_loads(core) == 2  # boot RAM and the one plugged run
    assert c.ok("query-status")["status"] == "running"

    # Detached: the reply comes first, DUMP_COMPLETED when it is written.
    core2 = tmp_path / "detached.core"
    out = c.command("dump-guest-memory", {"paging": False, "protocol": f"file:{core2}", "detach": True})
    assert out[-1] == {"return": {}}
    completed = c.event("DUMP_COMPLETED")
    assert completed["data"]["result"]["status"] == "completed"
    poll(lambda: c.ok("query-dump")["status"] == "completed", "query-dump to say completed")
    assert core2.read_bytes()[:4] == b"\x7fELF"

    # A dump that cannot be written fails cleanly and the machine runs on.
    out = c.command("dump-guest-memory", {"paging": False, "protocol": f"file:{tmp_path}/no/such/dir/x"})
    assert "error" in out[-1] and "DUMP_COMPLETED" in events(out)
    assert c.ok("query-dump")["status"] == "failed"
    assert c.ok("query-status")["status"] == "running"
    c.close()


def test_quit_sends_shutdown_to_every_client_the_quitting_one_first(served: str) -> None:
    watcher = Client(served)
    quitter = Client(served)
    out = quitter.command("quit")
    assert events(out) == ["SHUTDOWN"] and out[-1] == {"return": {}}
    shutdown = next(m for m in out if "event" in m)
    assert shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert watcher.event("SHUTDOWN")["data"] == shutdown["data"]
    for client in (watcher, quitter):
        with pytest.raises(EOFError):
            while True:
                client.read()
        client.close()
