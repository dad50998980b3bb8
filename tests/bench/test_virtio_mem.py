"""The virtio-mem benchmark runs and reports consistent figures (bench.run, quick mode).

Whether the request path stays flat with the region size is judged by ``make bench``
against its target; a unit test on a shared machine asserts no timing ratio."""

from __future__ import annotations

import pytest

from ramdiscard.bench import virtio_mem as bench


def test_bench_reports_consistent_figures() -> None:
    rows = bench.run(quick=True)
    cycle = rows[0]
    assert cycle["name"] == "plug/unplug 64 blocks"
    small, large = cycle["small_s"], cycle["large_s"]
    assert isinstance(small, float) and isinstance(large, float) and small > 0 and large > 0
    assert cycle["ratio"] == pytest.approx(large / small) and cycle["target"] == 1.1
    assert all(isinstance(r.get("seconds", 0.0), float) for r in rows[1:])
