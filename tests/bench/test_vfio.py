"""The vfio benchmark runs end to end and reports well-formed rows (no timing asserts)."""

from __future__ import annotations

import pytest

from tests.consumers.vfio.conftest import IOURING_OK, IOURING_REASON


@pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)
def test_bench_rows() -> None:
    from ramdiscard.bench import vfio as bench

    rows = [r for r in bench.run(quick=True) if "ours_ns" in r]
    assert [r["name"].split()[0] for r in rows] == ["plug", "unplug"] * len(bench.MEMORY_KINDS)
    for r in rows:
        assert r["group"] == "vfio" and r["ours_ns"] > 0 and r["raw_ns"] > 0
        base = r["c_ns"] if r["vs"] == "C" else r["raw_ns"]
        assert r["ratio"] == pytest.approx(r["ours_ns"] / base)
        assert r["target"] in (bench.PLUG_TARGET, bench.UNPLUG_TARGET)
        assert r["vs"] == "raw" or r["memory"] in bench.C_TARGET_KINDS
