"""``ramdiscard bench``: every bench module is listed, and every row gets a group."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from ramdiscard.cli import bench

SRC = Path(__file__).resolve().parents[2] / "src"


def test_every_bench_module_is_listed() -> None:
    found = {
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in (SRC / "ramdiscard" / "bench").glob("*.py")
        if p.name != "__init__.py"
    }
    assert found == set(bench.BENCH_MODULES) | set(bench.HELPER_MODULES)
    assert not set(bench.BENCH_MODULES) & set(bench.HELPER_MODULES)


def test_rows_without_group_get_their_area(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.SimpleNamespace(
        run=lambda quick: [
            {"name": "a", "ratio": 1.0},
            {"group": "own", "name": "b", "ratio": 2.0, "target": 3},
            {"name": "c", "ours_ns": 500, "c_ns": 100, "vs": "C", "ratio": 5.0, "target": 1.25},
            {"name": "d", "ours_ns": 100, "ns_per_run": 2000, "target_ns_per_run": 1500},
        ]
    )
    monkeypatch.setattr(bench, "BENCH_MODULES", ["ramdiscard.bench.fake"])
    monkeypatch.setattr(bench.importlib, "import_module", lambda name: fake)
    rows = bench.collect(quick=True)
    assert [r["group"] for r in rows] == ["fake", "own", "fake", "fake"]
    text = bench.render(rows, as_json=False)
    assert "<= 3x raw ok" in text
    assert "<= 1.25x C MISS" in text
    assert "<= 1.5 µs/run MISS" in text


def test_a_failing_group_is_a_failed_row_and_the_others_print(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(quick: bool) -> list[dict[str, object]]:
        raise RuntimeError("the destination failed: a page request went unanswered")

    modules = {
        "ramdiscard.bench.first": types.SimpleNamespace(run=lambda quick: [{"name": "one", "ratio": 1.0}]),
        "ramdiscard.bench.broken": types.SimpleNamespace(run=broken),
        "ramdiscard.bench.last": types.SimpleNamespace(run=lambda quick: [{"name": "two", "ratio": 2.0}]),
    }
    monkeypatch.setattr(bench, "BENCH_MODULES", list(modules))
    monkeypatch.setattr(bench.importlib, "import_module", modules.__getitem__)
    from ramdiscard.cli.main import main

    assert main(["bench", "--json"]) == 1
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["group"], r["name"]) for r in rows] == [
        ("first", "one"),
        ("broken", "broken"),
        ("last", "two"),
    ]
    assert "page request went unanswered" in rows[1]["failed"]
    assert "bench group broken failed" in captured.err
    assert "failed=RuntimeError" in bench.render(rows, as_json=False)
    monkeypatch.setattr(bench, "BENCH_MODULES", ["ramdiscard.bench.first"])
    assert main(["bench", "--json"]) == 0
