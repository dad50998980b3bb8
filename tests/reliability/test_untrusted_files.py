"""Hostile and unlucky paths: outputs, backing files and signals, through the real CLI,
QMP socket and files (issue 15, items 1, 2, 7, 8, 9).

Every command runs in a subprocess with a timeout, so a FIFO that blocks or a SIGBUS
fails the test instead of hanging or killing pytest. Device nodes are made with mknod in
temporary directories; hugetlbfs and tmpfs are mounted in temporary directories."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.units import MiB

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "160"}
SIGBUS_EXIT = -signal.SIGBUS

SMALL = """
boot-ram = "16M"
[[devices]]
id = "vmem0"
size = "256M"
requested-size = "16M"
{extra}
[workload]
touch = 1.0
"""


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", *args],
        capture_output=True, text=True, env=ENV, timeout=timeout,
    )  # fmt: skip


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("ramdiscard: error: "), r.stderr
    return lines[0]


def scenario(tmp_path: Path, extra: str = "", text: str = SMALL) -> Path:
    p = tmp_path / "s.toml"
    p.write_text(text.format(extra=extra))
    return p


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@contextlib.contextmanager
def mounted(fstype: str, where: Path, options: str) -> Iterator[Path]:
    where.mkdir()
    r = subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(where)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {fstype} here: {r.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# -- a bounded line-oriented QMP client over a served machine ---------------------------------


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = b""
        assert "QMP" in self._read()
        assert "return" in self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                assert chunk, "server closed the connection"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\n", 1)
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        return self._read()

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def served(tmp_path: Path, sc: Path) -> Iterator[tuple[subprocess.Popen[str], Qmp]]:
    sock = str(tmp_path / "qmp.sock")
    p = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "serve", str(sc), "--qmp", f"unix:{sock}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    qmp = None
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        qmp = Qmp(sock)
        yield p, qmp
        assert "return" in qmp.cmd("quit")
        p.communicate(timeout=30)
    finally:
        if qmp is not None:
            qmp.close()
        if p.poll() is None:
            p.kill()
            p.communicate()


def wait_plugged(qmp: Qmp, size: int) -> dict[str, Any]:
    """Set vmem0's requested size and wait (bounded) until the guest plugged it."""
    assert "return" in qmp.cmd("qom-set", path="vmem0", property="requested-size", value=size)
    deadline = time.monotonic() + 30
    while True:
        st: dict[str, Any] = qmp.cmd("x-ramdiscard-status")["return"]
        if st["plugged"] == size:
            return st
        assert time.monotonic() < deadline, f"plugged stays at {st['plugged']:#x}"
        time.sleep(0.05)


# -- item 1: dump onto hostile paths ------------------------------------------------------------


def test_dump_refuses_a_device_node_and_leaves_it(tmp_path: Path) -> None:
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    t0 = time.monotonic()
    r = cli("dump", str(scenario(tmp_path)), str(node))
    line = one_error_line(r)
    assert "character device" in line and str(node) in line
    st = os.lstat(node)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert leftovers(tmp_path) == []
    print(f"device node refused in {time.monotonic() - t0:.3f} s (whole command)")


def test_dump_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    r = cli("dump", str(scenario(tmp_path)), str(fifo), timeout=30)
    line = one_error_line(r)
    assert "FIFO" in line and str(fifo) in line
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    print(f"FIFO refused in {time.monotonic() - t0:.3f} s (whole command)")


def test_qmp_dump_to_a_fifo_is_refused_and_the_server_keeps_answering(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with served(tmp_path, scenario(tmp_path)) as (_p, qmp):
        wait_plugged(qmp, 16 * MiB)
        for target, kind in ((fifo, "FIFO"), (node, "character device")):
            t0 = time.monotonic()
            reply = qmp.cmd("x-ramdiscard-dump", path=str(target))
            took = time.monotonic() - t0
            assert reply["error"]["class"] == "GenericError" and kind in reply["error"]["desc"]
            assert "\n" not in reply["error"]["desc"]
            print(f"QMP x-ramdiscard-dump onto a {kind} refused in {took * 1000:.1f} ms")
            reply = qmp.cmd("x-ramdiscard-migrate", uri=f"file:{target}")
            assert kind in reply["error"]["desc"]
        assert qmp.cmd("query-status")["return"]["running"] is True
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and stat.S_ISCHR(os.lstat(node).st_mode)


def test_failed_dump_keeps_the_existing_file_and_removes_only_its_own(tmp_path: Path) -> None:
    with mounted("tmpfs", tmp_path / "small", "size=1M") as small:
        out = small / "core.elf"
        out.write_bytes(b"precious")
        os.chmod(out, 0o644)
        ino = out.stat().st_ino
        r = cli("dump", str(scenario(tmp_path)), str(out))  # 32 MiB into a 1 MiB filesystem
        one_error_line(r)
        assert out.read_bytes() == b"precious" and out.stat().st_ino == ino
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert sorted(os.listdir(small)) == ["core.elf"]


def test_dump_replaces_an_existing_0644_file_with_a_0600_one(tmp_path: Path) -> None:
    out = tmp_path / "core.elf"
    out.write_bytes(b"old")
    os.chmod(out, 0o644)
    r = cli("dump", str(scenario(tmp_path)), str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes()[:4] == b"\x7fELF"
    assert leftovers(tmp_path) == []


def test_dump_refuses_a_symlink_and_leaves_its_target(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "link"
    link.symlink_to(victim)
    line = one_error_line(cli("dump", str(scenario(tmp_path)), str(link)))
    assert "symbolic link" in line
    assert victim.read_bytes() == b"keep" and link.is_symlink()


# -- item 2: file-backed guest RAM ------------------------------------------------------------


def test_backing_file_with_data_is_refused_unless_overwrite(tmp_path: Path) -> None:
    backing = tmp_path / "guest.mem"
    data = os.urandom(64 * 1024)
    backing.write_bytes(data)
    extra = f'backing = "file"\npath = "{backing}"'
    line = one_error_line(cli("run", str(scenario(tmp_path, extra)), "--quiet"))
    assert str(backing) in line and "overwrite = true" in line
    assert backing.read_bytes() == data
    r = cli("run", str(scenario(tmp_path, extra + "\noverwrite = true")), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    assert backing.exists()  # the machine did not create it, so it does not remove it


def test_second_machine_on_a_backing_file_is_refused_and_the_first_is_unaffected(tmp_path: Path) -> None:
    backing = tmp_path / "guest.mem"
    first = scenario(tmp_path, f'backing = "file"\npath = "{backing}"')
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = scenario(second_dir, f'backing = "file"\npath = "{backing}"\noverwrite = true')
    with served(tmp_path, first) as (_p, qmp):
        wait_plugged(qmp, 16 * MiB)
        before = sha(backing)
        t0 = time.monotonic()
        line = one_error_line(cli("run", str(second), "--quiet"))
        print(f"second machine refused in {time.monotonic() - t0:.3f} s (whole command)")
        assert str(backing) in line and "in use" in line
        assert sha(backing) == before and backing.stat().st_size == 256 * MiB
        wait_plugged(qmp, 32 * MiB)
    assert not backing.exists()  # the first machine created it and removed it at exit


# -- item 7: a second signal during cleanup -----------------------------------------------------


def test_two_sigterms_10ms_apart_leave_nothing_in_dev_shm(tmp_path: Path) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    sc = tmp_path / "s.toml"
    sc.write_text(
        """
boot-ram = "16M"
[[devices]]
id = "vmem0"
size = "512M"
backing = "file"
[[consumers]]
type = "vfio"
backend = "auto"
[workload]
touch = 1.0
[[steps]]
requested-size = "384M"
[[steps]]
action = "pause"
seconds = 60
"""
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "run", str(sc), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    mine = f"/dev/shm/ramdiscard-{p.pid}-*"
    try:
        deadline = time.monotonic() + 60
        while True:
            files = glob.glob(f"{mine}/vmem0.mem")
            if files and os.stat(files[0]).st_blocks * 512 >= 384 * MiB:
                break
            assert time.monotonic() < deadline and p.poll() is None, "the machine never plugged"
            time.sleep(0.05)
        held = sum(os.stat(f).st_blocks * 512 for f in glob.glob(f"{mine}/*"))
        time.sleep(0.3)  # inside the pause step
        p.send_signal(signal.SIGTERM)
        time.sleep(0.01)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert glob.glob(mine) == []
    print(f"/dev/shm held by the machine before the signals: {held >> 20} MiB; after exit: 0")


# -- item 8: no SIGBUS ----------------------------------------------------------------------------


def test_hugetlbfs_backing_without_pool_answers_busy_instead_of_sigbus(tmp_path: Path) -> None:
    with mounted("hugetlbfs", tmp_path / "huge", "size=0,pagesize=2M") as huge:
        backing = huge / "guest.mem"
        text = SMALL + '[[steps]]\nrequested-size = "32M"\n'
        sc = scenario(tmp_path, f'backing = "file"\npath = "{backing}"\nprealloc = false', text=text)
        r = cli("run", str(sc), "--quiet", "--json")
        assert r.returncode != SIGBUS_EXIT, "the guest's first write died with SIGBUS"
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        (step,) = report["steps"]
        assert step["responses"].get("busy", 0) > 0 and "ack" not in step["responses"]
        assert report["final"]["plugged"] == 0
        assert report["final"]["devices"]["vmem0"]["metrics"]["host_failures"] > 0
        assert not backing.exists()


def test_dump_onto_the_machines_own_backing_file_is_refused(tmp_path: Path) -> None:
    backing = tmp_path / "guest.mem"
    sc = scenario(tmp_path, f'backing = "file"\npath = "{backing}"')
    line = one_error_line(cli("dump", str(sc), str(backing)))
    assert "backing guest memory" in line
    link = tmp_path / "hardlink"
    with served(tmp_path, sc) as (_p, qmp):
        wait_plugged(qmp, 16 * MiB)
        os.link(backing, link)
        before = sha(backing)
        for target in (backing, link):
            reply = qmp.cmd("x-ramdiscard-dump", path=str(target))
            assert "backing guest memory" in reply["error"]["desc"]
            reply = qmp.cmd("x-ramdiscard-migrate", uri=f"file:{target}")
            assert "backing guest memory" in reply["error"]["desc"]
        assert sha(backing) == before and backing.stat().st_size == 256 * MiB
        wait_plugged(qmp, 48 * MiB)  # the next plugs work: nothing was truncated under the guest
    assert link.exists()  # not created by the machine: left alone


# -- item 9: files holding guest memory are 0600 ----------------------------------------------


def test_snapshot_migration_and_dump_files_are_0600(tmp_path: Path) -> None:
    outs = {name: tmp_path / name for name in ("snap", "mig", "core", "qmp-mig", "qmp-core")}
    for p in outs.values():
        p.write_bytes(b"old")
        os.chmod(p, 0o644)
    steps = f"""
[[steps]]
action = "snapshot"
path = "{outs["snap"]}"
[[steps]]
action = "migrate"
path = "{outs["mig"]}"
[[steps]]
action = "dump"
path = "{outs["core"]}"
"""
    r = cli("run", str(scenario(tmp_path, text=SMALL + steps)), "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    with served(tmp_path, scenario(tmp_path)) as (_p, qmp):
        wait_plugged(qmp, 16 * MiB)
        assert "return" in qmp.cmd("x-ramdiscard-migrate", uri=f"file:{outs['qmp-mig']}")
        assert "return" in qmp.cmd("x-ramdiscard-dump", path=str(outs["qmp-core"]))
    for name, p in outs.items():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, name
        assert p.stat().st_size > 16 * MiB, name
    assert leftovers(tmp_path) == []


def test_guest_trace_path_that_is_a_fifo_is_refused_before_a_guest_boots(tmp_path: Path) -> None:
    fifo = tmp_path / "trace.log"
    os.mkfifo(fifo)
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "guest", "--qmp", f"unix:{tmp_path / 'q.sock'}",
         "--trace", str(fifo)],
        capture_output=True, text=True, env=ENV, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert "is a FIFO, not a regular file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trace.log"]  # no socket, no guest
