"""Every trace shipped in examples/traces (real QEMU runs with a real Linux guest, and
QEMU's sample) replays through the command line with no mismatch: the device answered
and sized as QEMU's own virtio-mem did, and replay inferred requested-size without
crying wolf. Counts are checked against the log text itself."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "examples" / "traces"
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
LOGS = sorted(TRACES.glob("*.log"))
REQUEST = re.compile(r"^\d+@[\d.]+:virtio_mem_(plug|unplug|unplug_all|state)_request\b", re.MULTILINE)
RESPONSE = re.compile(r"^\d+@[\d.]+:virtio_mem_send_response type=(\d+)", re.MULTILINE)
RESPONSE_NAMES = {0: "ACK", 1: "NACK", 2: "BUSY", 3: "ERROR"}


def test_there_are_recorded_traces_and_each_is_described() -> None:
    assert len([p for p in LOGS if p.name.startswith("qemu10-")]) >= 5
    readme = (TRACES / "README.md").read_text()
    for path in LOGS:
        assert f"`{path.name}`" in readme, f"{path.name} has no line in examples/traces/README.md"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path", LOGS, ids=[p.stem for p in LOGS])
def test_trace_replays_with_no_mismatch(path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "replay", str(path), "--json"],
        capture_output=True, text=True, env=ENV, timeout=110,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["mismatches"] == []
    text = path.read_text()
    assert out["requests"] == len(REQUEST.findall(text)) > 0
    logged: dict[str, int] = {}
    for code in RESPONSE.findall(text):
        name = RESPONSE_NAMES[int(code)]
        logged[name] = logged.get(name, 0) + 1
    assert out["responses"] == logged
    geometry = out["geometry"]
    for key in ("addr", "region_size", "block_size"):
        assert type(geometry[key]) is int and geometry[key] > 0
    assert type(out["peak_plugged"]) is int and out["peak_plugged"] % geometry["block_size"] == 0
    recorded = re.match(r"qemu10-\w+-(\d+)m-", path.name)
    if recorded is not None:  # our own recordings: the whole geometry comes from the log
        assert out["notes"] == []
        assert geometry["block_size"] == int(recorded.group(1)) << 20
