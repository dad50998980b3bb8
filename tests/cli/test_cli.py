"""The ramdiscard command, run as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramdiscard.consumers.dma import iouring_available
from ramdiscard.units import MiB
from tests.conftest import sample_trace

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "160"}


def cli(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", *args],
        capture_output=True, text=True, env=ENV, timeout=timeout, cwd=cwd,
    )  # fmt: skip


@pytest.mark.skipif(not iouring_available()[0], reason="io_uring sparse buffers unavailable here")
def test_demo_json_figures_are_consistent_and_plot_is_a_png(tmp_path: Path) -> None:
    plot = tmp_path / "demo.png"
    r = cli("demo", "--region-size", "512M", "--boot-ram", "64M", "--json", "--plot", str(plot), "--quiet")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    boot, region = 64 * MiB, 512 * MiB
    assert out["config"]["requested_sizes"] == [128 * MiB, 32 * MiB, 192 * MiB, 0]
    coord = out["runs"]["coordinated"]["steps"]
    assert [s["requested"] for s in coord] == [0, 128 * MiB, 32 * MiB, 192 * MiB, 0]
    for s in coord:
        # coordinated: exactly the plugged memory is pinned, plus boot RAM (pinned whole)
        assert s["plugged"] == s["requested"]
        assert s["vm_pin"] == s["pinned"] == s["plugged"] + boot
        assert s["dma_mappings"] == s["plugged"] // (2 * MiB) + 1
        assert s["stale_pinned"] == 0
    unco = out["runs"]["uncoordinated"]["steps"]
    for s in unco:
        # uncoordinated: the whole region plus boot RAM stays pinned whatever is plugged
        assert s["vm_pin"] == s["pinned"] == region + boot
        assert s["held"] == region + boot
        assert s["dma_mappings"] == 2
    assert unco[-1]["stale_pinned"] > 0
    assert out["plot"] == str(plot)
    data = plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(plot)
    assert img.shape[0] > 100 and img.shape[1] > 100


def test_demo_tables(tmp_path: Path) -> None:
    r = cli(
        "demo", "--region-size", "256M", "--boot-ram", "32M", "--backend", "null", "--quiet", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert "coordinated" in r.stdout and "uncoordinated" in r.stdout and "DMA mappings" in r.stdout
    assert (tmp_path / "ramdiscard-demo.png").exists()


def test_run_examples_json() -> None:
    for name in (
        "small-vfio.toml", "dynamic-memslots.toml", "memfd-backed.toml", "dma-limit.toml", "lifecycle.toml",
    ):  # fmt: skip
        r = cli("run", str(ROOT / "examples" / name), "--json", "--quiet")
        assert r.returncode == 0, (name, r.stderr)
        out = json.loads(r.stdout)
        assert out["steps"], name
        assert out["final"]["plugged"] == out["steps"][-1]["plugged"]


def test_run_reports_bad_key_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[devices]]\nid = "vmem0"\nsize = "1G"\nblock-size = "3M"\n')
    r = cli("run", str(bad))
    assert r.returncode == 1
    assert (
        r.stderr
        == 'ramdiscard: error: bad.toml: devices[0].block-size: must be a power of two >= 1M, got "3M"\n'
    )
    assert r.stdout == ""


@pytest.mark.parametrize(
    "args",
    [
        ("demo", "--region-size", "12Q"),
        ("demo", "--touch", "2"),
        ("replay", "/nonexistent/trace.log"),
        ("run", "/nonexistent.toml"),
        ("frobnicate",),
        ("replay", "--block-size", "x", "t"),
        ("demo", "--region-size", "100M", "--quiet"),
        ("serve", "/nonexistent.toml", "--qmp", "unix:/tmp/x.sock"),
        ("serve", "x.toml", "--qmp", "udp:1.2.3.4:5"),
        ("serve", "x.toml"),
        ("migrate",),
        ("migrate", "send", "--port", "1", "--size", "1Q"),
        ("migrate", "send", "--port", "1", "--size", "64M", "--low", "0", "--plugged", "4M", "--quiet"),
        ("dump", "/nonexistent.toml", "out.elf"),
        ("dump", "x.toml"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args: tuple[str, ...]) -> None:
    r = cli(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ramdiscard") and "Traceback" not in r.stderr


COMMANDS = ("demo", "run", "replay", "bench", "serve", "top", "guest", "migrate", "dump")


def test_help_for_every_command() -> None:
    import argparse

    from ramdiscard.cli.main import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) == set(COMMANDS)  # a new command must be added here and to docs/cli.md
    docs = (ROOT / "docs" / "cli.md").read_text()
    r = cli("--help")
    assert r.returncode == 0
    for cmd in (*COMMANDS, "migrate send", "migrate receive"):
        assert cmd.split()[0] in r.stdout
        sub = cli(*cmd.split(), "--help")
        assert sub.returncode == 0 and "usage: ramdiscard " + cmd in sub.stdout
        assert f"ramdiscard {cmd}" in docs
        for line in sub.stdout.splitlines():  # every option has a help text
            if line.startswith("  -") and "  " not in line.strip():
                idx = sub.stdout.splitlines().index(line)
                assert sub.stdout.splitlines()[idx + 1].startswith(" " * 10), (cmd, line)


def test_dump_command_writes_boot_ram_and_plugged_memory(tmp_path: Path) -> None:
    sc = tmp_path / "s.toml"
    sc.write_text(
        'boot-ram = "16M"\n[[devices]]\nid = "vmem0"\nsize = "256M"\n[[steps]]\nrequested-size = "32M"\n'
    )
    out = tmp_path / "core.elf"
    r = cli("dump", str(sc), str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["bytes"] == 48 * MiB and info["plugged"] == 32 * MiB and info["segments"] == 2
    assert out.read_bytes()[:4] == b"\x7fELF"


def test_migrate_send_and_receive_between_two_processes() -> None:
    recv = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "migrate", "receive", "--size", "128M", "--low", "4M",
         "--json", "--timeout", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert recv.stderr is not None
        line = recv.stderr.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        port = line.rsplit(":", 1)[1].strip()
        r = cli(
            "migrate", "send", "--port", port, "--size", "128M", "--low", "4M", "--plugged", "32M", "--json"
        )
        assert r.returncode == 0, r.stderr
        out, err = recv.communicate(timeout=60)
    finally:
        if recv.poll() is None:
            recv.kill()
    assert recv.returncode == 0, err
    row = json.loads(out)
    assert row["role"] == "destination" and row["bad_blocks"] == 0 and row["resident_outside_plugged"] == 0
    assert row["page_bytes"] == 36 * MiB


def test_replay_sample_trace_has_no_mismatch() -> None:
    trace = str(sample_trace())
    r = cli("replay", trace, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["mismatches"] == []
    assert out["geometry"] == {
        "id": "vmem0",
        "addr": 0x1_0000_0000,
        "region_size": 4 << 30,
        "block_size": 2 * MiB,
    }
    assert out["requests"] == 16 and out["peak_plugged"] == 1 << 30
    assert out["peak_pinned"] == 1 << 30 and out["peak_dma_mappings"] == 512
    r = cli("replay", trace, "--consumer", "kvm", "--dynamic-memslots", "--dma-limit", "33000", "--json")
    out = json.loads(r.stdout)
    assert out["memslots"]["device_memslots"] == 4 and out["memslots"]["peak_mapped"] == 1
    assert out["qemu_dma_check"]["passes"] is False
    # 33000 - 32764 + 1 = 237 mappings left for 4 GiB: 4G / 32M = 128 fits, 4G / 16M = 256 does not
    assert out["qemu_dma_check"]["smallest_block_size"] == 32 * MiB


def test_replay_junk_trace(tmp_path: Path) -> None:
    t = tmp_path / "t.log"
    t.write_text("1@1.0:virtio_mem_plug_request addr=zzz nb_blocks=1\n")
    r = cli("replay", str(t))
    assert r.returncode == 1 and r.stderr.startswith("ramdiscard: error: line 1:")


def _vm_pin(pid: int) -> int:
    """VmPin of process ``pid`` in kB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmPin:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_releases_everything(tmp_path: Path, sig: signal.Signals) -> None:
    work = tmp_path / "work"
    sc = tmp_path / "s.toml"
    sc.write_text(
        """
boot-ram = "32M"
[[devices]]
id = "vmem0"
size = "256M"
backing = "file"
[[consumers]]
type = "vfio"
backend = "auto"
[[steps]]
requested-size = "64M"
[[steps]]
action = "pause"
seconds = 60
"""
    )
    p = subprocess.Popen(
        [sys.executable, "-m", "ramdiscard.cli.main", "run", str(sc), "--workdir", str(work), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        # Up and running its steps: the file-backed RAM exists and the vfio consumer holds
        # io_uring pins (the pause step then keeps it there for 60 s).
        deadline = time.monotonic() + 30
        while not ((work / "vmem0.mem").exists() and _vm_pin(p.pid) > 0):
            assert time.monotonic() < deadline and p.poll() is None, "machine never came up"
            time.sleep(0.05)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip() == "ramdiscard: interrupted; everything released"
    assert list(work.iterdir()) == []
