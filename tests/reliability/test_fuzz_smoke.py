"""Smoke runs of every fuzz target: a fixed number of inputs each, zero findings.

A target that needs a host facility this machine lacks is skipped with the reason it reports.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ramdiscard.fuzz import fuzz, replay
from ramdiscard.fuzz.__main__ import main
from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.targets import all_targets

TARGETS = {t.name: t for t in all_targets()}
SMOKE_INPUTS = 200


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_target_smoke(name: str, tmp_path: Path) -> None:
    target = TARGETS[name]
    assert target.unavailable() is None  # every module under test is part of the project
    # A fixed amount of work; the time is only a bound, so the outcome does not depend on speed.
    report = fuzz(target, seconds=120, max_inputs=SMOKE_INPUTS, seed=1234, crash_dir=tmp_path)
    assert report.inputs == SMOKE_INPUTS, "the run stopped at its time bound"
    details = [f"{f.signature} x{f.count}: {f.message} -> {f.path}" for f in report.findings]
    assert report.crashes == 0, "\n".join(details)


class _Boom:
    """A harness with a planted bug: inputs containing b'BUG' raise."""

    closed = 0

    def run(self, data: bytes) -> object:
        if b"BUG" in data:
            raise KeyError("planted")
        return len(data) % 3

    def deep_check(self) -> None:
        pass

    def close(self) -> None:
        _Boom.closed += 1


def test_engine_reports_saves_and_replays_a_planted_bug(tmp_path: Path) -> None:
    target = Target("planted", "test", lambda: [b"xxBUxx", b"BUG"], _Boom)
    report = fuzz(target, seconds=5, max_inputs=300, crash_dir=tmp_path)
    assert report.inputs == 300 and report.crashes == 1
    (finding,) = report.findings
    assert finding.signature.startswith("KeyError@") and finding.path is not None
    assert b"BUG" in finding.path.read_bytes()
    assert "planted" in finding.path.with_suffix(".txt").read_text()
    with pytest.raises(KeyError):
        replay(target, finding.path.read_bytes())


def test_same_seed_same_inputs() -> None:
    seen: list[list[bytes]] = [[], []]

    def make(i: int) -> Target:
        class Rec:
            def run(self, data: bytes) -> object:
                seen[i].append(data)
                return data[:1]

            def deep_check(self) -> None:
                pass

            def close(self) -> None:
                pass

        return Target("rec", "test", lambda: [b"seed-input"], Rec)

    fuzz(make(0), seconds=10, max_inputs=200, seed=7)
    fuzz(make(1), seconds=10, max_inputs=200, seed=7)
    assert seen[0] == seen[1] and len(set(seen[0])) > 50


def test_cli_lists_and_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--list"]) == 0
    assert "virtio-request" in capsys.readouterr().out
    assert main(["--seconds", "1", "--target", "virtio-request", "--crash-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "virtio-request" in out and "crashes 0" in out
    assert main(["--target", "nope"]) == 2
