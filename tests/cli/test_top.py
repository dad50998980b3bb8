"""``ramdiscard top`` through the real CLI, against ``ramdiscard serve`` and a real QEMU;
the live screen driven in tmux (keys sent, pane captured)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.units import MiB
from tests.cli.test_cli import ENV, cli
from tests.qmp.qemu_binary import find_qemu

pytest.importorskip("qemu.qmp", reason="ramdiscard top needs the 'cli' extra (qemu.qmp)")
pytest.importorskip("rich", reason="ramdiscard top needs the 'cli' extra (rich)")

ROOT = Path(__file__).resolve().parents[2]
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu")
SCENARIO = """
name = "top"
boot-ram = "32M"
[[devices]]
id = "vmem0"
size = "512M"
block-size = "2M"
backing = "anonymous"
[[consumers]]
type = "vfio"
backend = "mlock"
coordinate-discards = true
"""


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def qmp_call(sock: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    """Run ``commands`` on the QMP server at ``sock`` with qemu.qmp; their replies."""
    from qemu.qmp import QMPClient

    async def go() -> list[Any]:
        q = QMPClient("test")
        await asyncio.wait_for(q.connect(sock), 10)
        try:
            return [await asyncio.wait_for(q.execute(name, args), 30) for name, args in commands]
        finally:
            with contextlib.suppress(EOFError):  # after "quit" the server hangs up first
                await q.disconnect()

    return asyncio.run(go())


def listening(sock: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock)
    except OSError:
        return False
    finally:
        s.close()
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer
    with tempfile.TemporaryDirectory(prefix="rdtop-") as d:
        yield Path(d)


@pytest.fixture
def served(short_dir: Path) -> Iterator[str]:
    """``ramdiscard serve`` on a unix socket; its address. Quit over QMP at the end."""
    sc = short_dir / "s.toml"
    sc.write_text(SCENARIO)
    sock = str(short_dir / "q.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "serve", str(sc), "--qmp", f"unix:{sock}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        wait_for(lambda: listening(sock) or proc.poll() is not None, "serve's QMP socket", 60)
        assert proc.poll() is None, proc.communicate(timeout=30)
        yield f"unix:{sock}"
        qmp_call(sock, ("quit", None))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def top_json(address: str) -> dict[str, Any]:
    r = cli("top", "--qmp", address, "--once", "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def test_top_once_json_against_serve(served: str) -> None:
    sock = served.partition(":")[2]
    snap = top_json(served)
    (listed,) = qmp_call(sock, ("query-memory-devices", None))
    assert snap["extensions"] is True
    assert snap["server"].endswith("(ramdiscard 0.1.0)")
    (dev,) = snap["devices"]
    data = listed[0]["data"]
    for key in ("id", "memaddr", "block-size", "requested-size", "size", "max-size", "node", "memdev"):
        assert dev[key] == data[key]
    assert dev["requested-size"] == 0 and dev["max-size"] == 512 * MiB
    assert snap["status"]["migration"] == {"status": "none"}

    qmp_call(sock, ("qom-set", {"path": "vmem0", "property": "requested-size", "value": 64 * MiB}))
    snap = wait_for(
        lambda: (s := top_json(served))["devices"][0]["size"] == 64 * MiB and s, "the guest to plug 64M"
    )
    dev = snap["devices"][0]
    assert dev["requested-size"] == 64 * MiB and dev["usable-region-size"] >= 64 * MiB
    st = snap["status"]
    assert st["pinned"] == 32 * MiB + 64 * MiB  # boot RAM + plugged: pins follow the plug
    assert st["dma-mappings"] == 1 + 64 * MiB // (2 * MiB)


def test_top_shows_migration_progress(served: str, short_dir: Path) -> None:
    sock = served.partition(":")[2]
    qmp_call(sock, ("qom-set", {"path": "vmem0", "property": "requested-size", "value": 32 * MiB}))
    wait_for(lambda: top_json(served)["devices"][0]["size"] == 32 * MiB, "the guest to plug 32M")
    target = short_dir / "snap.bin"
    qmp_call(sock, ("x-ramdiscard-migrate", {"uri": f"file:{target}"}))
    mig = top_json(served)["status"]["migration"]
    assert mig["status"] == "completed" and mig["uri"] == f"file:{target}"
    assert mig["transferred"] == mig["total"] >= 32 * MiB


class Tmux:
    """A private tmux server (its own socket name) running one command in a pane."""

    def __init__(self, command: list[str]) -> None:
        self.name = f"rdtop-{os.getpid()}-{secrets.token_hex(4)}"
        shell = " ".join(_quote(a) for a in command) + "; echo EXIT=$?; sleep 120"
        env = {k: v for k, v in ENV.items() if not k.startswith("TMUX")}
        subprocess.run(self._cmd("new-session", "-d", "-x", "160", "-y", "50", shell), check=True,
                       env=env, timeout=30)  # fmt: skip

    def _cmd(self, *args: str) -> list[str]:
        return ["tmux", "-L", self.name, *args]

    def screen(self) -> str:
        r = subprocess.run(self._cmd("capture-pane", "-p"), capture_output=True, text=True, timeout=30)
        return r.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(self._cmd("send-keys", *keys), check=True, timeout=30)

    def close(self) -> None:
        subprocess.run(self._cmd("kill-server"), capture_output=True, timeout=30)


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


@pytest.fixture
def tmux_top() -> Iterator[Callable[[str], Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    started: list[Tmux] = []

    def start(address: str) -> Tmux:
        t = Tmux([sys.executable, "-m", "ramdiscard.cli.main", "top", "--qmp", address, "--interval", "0.3"])
        started.append(t)
        return t

    yield start
    for t in started:
        t.close()


EVENT_ROW = re.compile(r"\d\d:\d\d:\d\d\.\d{3}\s*│\s*vmem0\s*│\s*(\d+ MiB)")


@pytest.mark.parametrize("quit_key", ["q", "C-c"])
def test_top_live_screen_follows_resizes_and_quits(
    served: str, tmux_top: Callable[[str], Tmux], quit_key: str
) -> None:
    sock = served.partition(":")[2]
    t = tmux_top(served)
    screen = wait_for(lambda: "x-ramdiscard-status" in (s := t.screen()) and s, "the live screen")
    assert "vmem0" in screen and "(none yet)" in screen and "DMA mappings" in screen
    qmp_call(sock, ("qom-set", {"path": "vmem0", "property": "requested-size", "value": 96 * MiB}))
    # the event table gets the size-change events as they arrive; the last one is the final size
    screen = wait_for(lambda: "96 MiB" in EVENT_ROW.findall(s := t.screen()) and s, "the 96M event row")
    device_row = next(line for line in screen.splitlines() if line.startswith("│ vmem0"))
    assert device_row.count("96 MiB") == 2  # requested and plugged
    t.keys(quit_key)
    screen = wait_for(lambda: "EXIT=" in (s := t.screen()) and s, "top to exit")
    assert "EXIT=0" in screen and "Traceback" not in screen


def find_any_qemu() -> tuple[str | None, str]:
    """The differential tests' QEMU (tests/qmp/qemu_binary.py), else one on PATH: top
    needs only QMP, any version does."""
    binary, why = find_qemu()
    if binary is not None:
        return str(binary), ""
    on_path = shutil.which("qemu-system-x86_64")
    return (on_path, "") if on_path else (None, f"{why}; no qemu-system-x86_64 on PATH either")


@pytest.fixture
def qemu(short_dir: Path) -> Iterator[str]:
    binary, why = find_any_qemu()
    if binary is None:
        pytest.skip(why)
    sock = str(short_dir / "qemu.sock")
    firmware = [arg for d in FIRMWARE_DIRS if os.path.isdir(d) for arg in ("-L", d)]
    proc = subprocess.Popen(
        [binary, "-S", "-machine", "q35", "-m", "1G,maxmem=8G", "-nodefaults", "-display", "none",
         *firmware, "-object", "memory-backend-ram,id=mem0,size=1G",
         "-device", "virtio-mem-pci,id=vmem0,memdev=mem0,block-size=2M,requested-size=256M",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: listening(sock) or proc.poll() is not None, "QEMU's QMP socket")
        assert proc.poll() is None, proc.communicate(timeout=30)
        yield f"unix:{sock}"
        qmp_call(sock, ("quit", None))
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_top_against_real_qemu(qemu: str, tmux_top: Callable[[str], Tmux]) -> None:
    sock = qemu.partition(":")[2]
    snap = top_json(qemu)
    assert snap["server"].startswith("QEMU ")
    assert snap["extensions"] is False and snap["status"] is None  # QEMU: CommandNotFound
    (dev,) = snap["devices"]
    assert dev["id"] == "vmem0" and dev["block-size"] == 2 * MiB and dev["max-size"] == 1024 * MiB
    assert dev["requested-size"] == 256 * MiB and dev["size"] == 0  # -S: no guest plugs anything
    assert dev["usable-region-size"] is None  # QEMU's QMP does not expose it
    qmp_call(sock, ("qom-set", {"path": "/machine/peripheral/vmem0", "property": "requested-size",
                                "value": 512 * MiB}))  # fmt: skip
    assert top_json(qemu)["devices"][0]["requested-size"] == 512 * MiB
    t = tmux_top(qemu)
    screen = wait_for(lambda: "vmem0" in (s := t.screen()) and s, "the live screen on QEMU")
    assert "x-ramdiscard-status not offered by this server" in screen
    assert "512 MiB" in next(line for line in screen.splitlines() if line.startswith("│ vmem0"))
    t.keys("q")
    assert "EXIT=0" in wait_for(lambda: "EXIT=" in (s := t.screen()) and s, "top to exit")


def test_top_refuses_bad_use_in_one_line(short_dir: Path) -> None:
    for args, msg in (
        (("--qmp", f"unix:{short_dir}/none.sock", "--once"), "cannot connect"),
        (("--qmp", "bogus", "--once"), "invalid QMP address"),
        (("--qmp", f"unix:{short_dir}/none.sock", "--json"), "--json needs --once"),
    ):
        r = cli("top", *args, timeout=60)
        assert r.returncode == 1 and r.stdout == ""
        assert r.stderr.startswith("ramdiscard: error: ") and r.stderr.count("\n") == 1 and msg in r.stderr
