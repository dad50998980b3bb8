"""The benchmark runs and reports well-formed rows (its numbers are not asserted: the
machine is shared and timing ratios are noise-bound)."""

from __future__ import annotations

from ramdiscard.bench import hostmem as bench


def test_quick_run_rows() -> None:
    rows = bench.run(quick=True)
    seen = {(r["name"], r["backing"], r["chunk"]) for r in rows}
    for backing in ("anon_thp", "anon_4k", "memfd"):
        for chunk in bench.CHUNKS:
            for op in ("populate", "discard"):
                assert (op, backing, chunk) in seen
    for r in rows:
        assert set(r) == {
            "group",
            "name",
            "backing",
            "chunk",
            "ours_ns",
            "raw_ns",
            "ratio",
            "gib_s",
            "target",
        }
        assert r["group"] == "hostmem"
        assert r["target"] == (bench.TARGET if r["chunk"] >= 2 * 1024 * 1024 else None)
        assert isinstance(r["ours_ns"], int) and r["ours_ns"] > 0
        assert isinstance(r["raw_ns"], int) and r["raw_ns"] > 0
        assert isinstance(r["ratio"], float) and r["ratio"] > 0
    assert "ratio" in bench.format_table(rows)
