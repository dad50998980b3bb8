"""The vfio benchmark runs end to end and reports well-formed rows (no timing asserts)."""

from __future__ import annotations

import pytest

from tests.consumers.vfio.conftest import IOURING_OK, IOURING_REASON


@pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)
def test_bench_rows() -> None:
    from ramdiscard.bench import vfio as bench

    rows = bench.run(quick=True)
    assert [r["name"].split()[0] for r in rows] == ["plug", "unplug"] * len(bench.MEMORY_KINDS)
    for r in rows:
        assert r["group"] == "vfio" and r["ours_ns"] > 0 and r["raw_ns"] > 0
        assert r["ratio"] == pytest.approx(r["ours_ns"] / r["raw_ns"])
        assert r["target"] in (bench.PLUG_TARGET, bench.UNPLUG_TARGET)
