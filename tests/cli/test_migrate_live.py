"""``ramdiscard migrate send|receive --live``, run as subprocesses, and its progress display."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ramdiscard.cli.migrate_live import LiveDisplay, progress_line
from ramdiscard.hostmem import uffd
from ramdiscard.migration.precopy import PrecopyStats
from ramdiscard.units import MiB

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "COLUMNS": "160"}
CMD = [sys.executable, "-m", "ramdiscard.cli.main", "migrate"]

live_only = pytest.mark.skipif(uffd.available() is not None, reason=f"no WP_ASYNC: {uffd.available()}")


@contextmanager
def _receiver(*args: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    recv = subprocess.Popen(
        [*CMD, "receive", "--live", "--timeout", "60", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    try:
        assert recv.stderr is not None
        line = recv.stderr.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield recv, line.rsplit(":", 1)[1].strip()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait(10)


@live_only
def test_live_migration_with_the_guest_writing_ends_with_equal_digests() -> None:
    with _receiver("--size", "256M", "--low", "4M", "--json") as (recv, port):
        r = subprocess.run(
            [*CMD, "send", "--live", "--port", port, "--size", "256M", "--low", "4M", "--plugged", "64M",
             "--write-rate", "20M", "--downtime-limit", "50", "--max-bandwidth", "400M"],
            capture_output=True, text=True, env=ENV, timeout=120,
        )  # fmt: skip
        out, err = recv.communicate(timeout=60)
    assert r.returncode == 0, r.stderr
    assert recv.returncode == 0, err
    dest = json.loads(out)
    assert dest["resident_outside_plugged"] == 0 and dest["plugged"] == 64 * MiB
    # stderr is no terminal: plain lines, the setup line then one per round
    lines = r.stderr.splitlines()
    assert lines[0] == "active: sending 68 MiB of populated memory", lines
    rounds = [ln for ln in lines if ln.startswith("round ")]
    assert rounds and all(
        "dirty" in ln and "remaining" in ln and "expected downtime" in ln and "transferred" in ln
        for ln in rounds
    )
    assert [int(ln.split()[1].rstrip(":")) for ln in rounds] == list(range(1, len(rounds) + 1))
    summary = r.stdout.strip()
    assert summary.startswith("source: live migration completed: total "), summary
    assert "downtime" in summary and f"{len(rounds)} round(s)" in summary
    assert summary.rsplit("digest ", 1)[1][:16] == dest["digest"][:16]
    assert dest["rounds"] == len(rounds)


@live_only
def test_live_json_summary_and_bad_options() -> None:
    with _receiver("--size", "64M", "--low", "0", "--json", "--quiet") as (recv, port):
        r = subprocess.run(
            [*CMD, "send", "--live", "--port", port, "--size", "64M", "--low", "0", "--plugged", "16M",
             "--json", "--quiet"],
            capture_output=True, text=True, env=ENV, timeout=120,
        )  # fmt: skip
        out, err = recv.communicate(timeout=60)
    assert r.returncode == 0 and recv.returncode == 0, (r.stderr, err)
    assert r.stderr == ""
    src, dst = json.loads(r.stdout), json.loads(out)
    assert src["status"] == "completed" and src["populated"] == 16 * MiB
    assert src["rounds"] == dst["rounds"] >= 1 and len(src["round_bytes"]) == src["rounds"] + 1
    assert src["digest"] == dst["digest"]
    assert src["total_time"] >= src["downtime"] >= 0
    for bad, msg in (
        (["--downtime-limit", "10"], "--downtime-limit needs --live"),
        (["--live", "--downtime-limit", "-1"], "--downtime-limit must be in [0, 2000000] ms"),
        (["--write-rate", "1M"], "--write-rate needs --live"),
        (["--scenario", "x.toml"], "send --scenario needs --live"),
        (["--live", "--scenario", "x.toml", "--write-rate", "1M"], "--write-rate is for the demo guest"),
    ):
        r = subprocess.run(
            [*CMD, "send", "--port", "1", *bad], capture_output=True, text=True, env=ENV, timeout=60
        )
        assert r.returncode == 2, (bad, r.stderr)
        assert r.stderr.startswith(f"ramdiscard migrate send: error: {msg}"), r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


PINNED = """
name = "pinned"
boot-ram = "16M"
[[devices]]
id = "vm0"
size = "256M"
requested-size = "64M"
backing = "memfd"
[[consumers]]
type = "vfio"
backend = "auto"
[workload]
write-rate = "20M"
"""


@live_only
def test_ctrl_c_cancels_and_the_source_runs_on_intact(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(PINNED)
    with _receiver("--scenario", str(scenario), "--json") as (recv, port):
        # 4 MiB/s: the first round alone takes far longer than the wait for it to start
        send = subprocess.Popen(
            [*CMD, "send", "--live", "--scenario", str(scenario), "--port", port, "--json",
             "--max-bandwidth", "4M"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            assert send.stderr is not None
            line = send.stderr.readline()
            assert line.startswith("active: sending 80 MiB"), line
            send.send_signal(signal.SIGINT)
            out, err = send.communicate(timeout=60)
        finally:
            if send.poll() is None:
                send.kill()
                send.wait(10)
        rout, rerr = recv.communicate(timeout=60)
    assert send.returncode == 130, (out, err)
    row = json.loads(out)
    assert row["status"] == "cancelled" and row["intact"], row
    assert row["problems"] == []
    assert row["plugged"] == 64 * MiB
    if row["pinned"]:  # a pinning backend (io_uring, mlock): every byte stays pinned
        assert row["pinned"] == 80 * MiB
    # the destination was told nothing good: a one-line error, back to fresh
    assert recv.returncode == 1, rerr
    assert rout == ""
    assert rerr.splitlines()[-1].startswith("ramdiscard: error:") and "Traceback" not in rerr, rerr


def _stats(**kw: object) -> PrecopyStats:
    st = PrecopyStats()
    for k, v in kw.items():
        setattr(st, k, v)
    return st


def test_progress_line_shows_round_dirty_rate_remaining_downtime_transferred() -> None:
    first = _stats(status="active", rounds=1, total_bytes=64 * MiB, stream_bytes=16 * MiB)
    assert progress_line(first) == (
        "round 1: dirty -, remaining 48 MiB, expected downtime -, transferred 16 MiB"
    )
    later = _stats(
        status="active", rounds=3, total_bytes=64 * MiB, stream_bytes=80 * MiB,
        round_bytes=[64 * MiB, 8 * MiB], bandwidth=float(100 * MiB), dirty_rate=float(2 * MiB),
        remaining=MiB, expected_downtime=0.0125,
    )  # fmt: skip
    assert progress_line(later) == (
        "round 3: dirty 2 MiB/s, remaining 1 MiB, expected downtime 12.5 ms, transferred 80 MiB"
    )
    assert progress_line(_stats(status="device", rounds=4, remaining=MiB)).startswith("round 4 switchover")


def test_display_rewrites_one_line_on_a_terminal_and_prints_lines_otherwise() -> None:
    a = _stats(status="active", rounds=1, total_bytes=8 * MiB, stream_bytes=MiB)
    b = _stats(status="active", rounds=1, total_bytes=8 * MiB, stream_bytes=2 * MiB)
    tty = io.StringIO()
    d = LiveDisplay(tty, tty=True, quiet=False)
    d.update(a)
    d.update(b)
    d.close()
    text = tty.getvalue()
    assert text == "\r" + progress_line(a) + "\x1b[K" + "\r" + progress_line(b) + "\x1b[K" + "\n"
    plain = io.StringIO()
    d = LiveDisplay(plain, tty=False, quiet=False)
    for st in (_stats(status="active", total_bytes=8 * MiB), a, b, _stats(status="active", rounds=2)):
        d.update(st)
    d.close()
    assert plain.getvalue().splitlines() == [
        "active: sending 8 MiB of populated memory",
        progress_line(a),
        progress_line(_stats(status="active", rounds=2)),
    ]
    quiet = io.StringIO()
    d = LiveDisplay(quiet, tty=True, quiet=True)
    d.update(a)
    d.close()
    assert quiet.getvalue() == ""


def test_display_redraws_while_a_round_runs() -> None:
    """On a terminal the line follows the figures between progress callbacks."""
    out = io.StringIO()
    d = LiveDisplay(out, tty=True, quiet=False)
    st = _stats(status="active", rounds=1, total_bytes=8 * MiB, stream_bytes=MiB)
    d.watch(st)
    st.stream_bytes = 3 * MiB
    deadline = time.monotonic() + 10
    while "transferred 3 MiB" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    d.close()
    assert "transferred 3 MiB" in out.getvalue()
    assert out.getvalue().endswith("\n")
