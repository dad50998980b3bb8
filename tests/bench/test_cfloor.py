"""The C floor machinery: compiling the shipped programs, running them, and the clear
skip where no compiler exists (figures are not asserted: the machine is shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ramdiscard.bench import cfloor
from ramdiscard.bench import rdm as rdm_bench
from tests.consumers.vfio.conftest import IOURING_OK, IOURING_REASON

needs_cc = pytest.mark.skipif(cfloor.compiler() is None, reason="no C compiler on this host")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAMDISCARD_CACHE", str(tmp_path / "cache"))


def test_no_compiler_is_a_clear_skip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc-for-ramdiscard-test")
    with pytest.raises(cfloor.NoFloor, match="no compiler: C floor skipped"):
        cfloor.build("bitfloor")
    rows = rdm_bench.run(quick=True)
    notes = [r for r in rows if "ours_ns" not in r]
    assert notes and "no compiler: C floor skipped" in notes[0]["notes"]
    assert all(r["c_ns"] is None for r in rows if "ours_ns" in r)


def test_a_failing_build_is_a_clear_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'cc: broken on purpose' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    with pytest.raises(cfloor.NoFloor, match="broken on purpose"):
        cfloor.build("plugfloor")


@needs_cc
def test_build_is_cached_by_source_and_compiler() -> None:
    first = cfloor.build("bitfloor")
    assert first.is_file() and first.parent == cfloor.cache_dir()
    assert cfloor.build("bitfloor") == first
    assert cfloor.build("plugfloor") != first


@needs_cc
def test_bitscan_floor_finds_the_runs_and_answers_all_set() -> None:
    nbits = 1 << 14
    words = np.zeros(nbits // 64, dtype="<u8")
    words[3] = 0b1011
    words[10:20] = (1 << 64) - 1
    out = cfloor.bitscan_floor(words.tobytes(), nbits, 0, nbits, 1.0)
    assert (out["runs"], out["bits"]) == (3, 3 + 640) and out["best_ns"] >= 0
    assert cfloor.bitscan_floor(words.tobytes(), nbits, 640, 1280, 1.0, mode="allset")["runs"] == 1
    assert cfloor.bitscan_floor(words.tobytes(), nbits, 0, 1280, 1.0, mode="allset")["runs"] == 0


@needs_cc
def test_rdm_bench_rows_carry_the_c_floor() -> None:
    rows = rdm_bench.run(quick=True)
    measured = [r for r in rows if "ours_ns" in r]
    names = {r["name"] for r in measured}
    for pattern in rdm_bench.PATTERNS:
        assert any(n.startswith(f"replay {pattern}, 2^19") for n in names)
    for r in measured:
        assert r["c_ns"] is not None and r["ours_ns"] > 0
        assert r["ratio"] == pytest.approx(r["ours_ns"] / r["c_ns"])
        assert ("target" in r) != ("target_ns_per_run" in r)


@needs_cc
@pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)
def test_plug_floor_cycles() -> None:
    with cfloor.PlugFloor("anonymous", False, 2 * 1024 * 1024, 4, 16) as floor:
        for mode in ("warm", "cold", "prealloc"):
            plug, unplug = floor.cycle(mode)
            assert plug > 0 and unplug > 0
        with pytest.raises(ValueError, match="unknown plugfloor mode"):
            floor.cycle("sideways")
