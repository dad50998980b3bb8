"""The pictures, read back as matplotlib objects (series and axes, not pixels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.units import GiB
from tests.cli.test_cli import cli

pytest.importorskip("matplotlib", reason="plots need the 'cli' extra (matplotlib)")


def _lines(ax: Any) -> dict[str, Any]:
    return {line.get_label(): line for line in ax.get_lines()}


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("demo")
    r = cli("demo", "--region-size", "256M", "--boot-ram", "32M", "--backend", "mlock", "--json", "--quiet",
            "--plot", str(tmp / "demo.png"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    assert Path(out["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return out


def test_demo_figure_compares_both_runs_on_one_step_axis_and_one_scale(demo_json: dict[str, Any]) -> None:
    from ramdiscard.cli.plots import demo_figure

    runs = [
        {"name": name, "coordinated": name == "coordinated", "region_size": r["region_size"],
         "steps": r["steps"]}
        for name, r in demo_json["runs"].items()
    ]  # fmt: skip
    assert [r["name"] for r in runs] == ["coordinated", "uncoordinated"]
    assert demo_json["config"]["backend"] == "mlock"
    fig = demo_figure(runs, pin_key="vm_lck")
    (ax,) = fig.get_axes()  # one panel: one x axis (steps) and one y scale for both runs
    labels = [row["step"] for row in runs[0]["steps"]]
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert "step" in ax.get_xlabel() and "time" not in ax.get_xlabel().split("(")[0]
    assert ax.get_ylabel() == "GiB"
    lines = _lines(ax)
    for run in runs:
        name = run["name"]
        held = lines[f"held by the VM: {name} (256 MiB region)"]
        assert list(held.get_xdata()) == list(range(len(labels)))
        assert list(held.get_ydata()) == [row["held"] / GiB for row in run["steps"]]
        pin = lines[f"VmLck: {name}"]
        assert list(pin.get_ydata()) == [row["vm_lck"] / GiB for row in run["steps"]]
    plugged = lines["plugged by the guest (= requested)"]
    assert list(plugged.get_ydata()) == [row["plugged"] / GiB for row in runs[0]["steps"]]
    # the gap the picture is about is inside the visible range
    highest = max(row["held"] for run in runs for row in run["steps"]) / GiB
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] > highest
    coord_end = runs[0]["steps"][-1]["held"]
    unco_end = runs[1]["steps"][-1]["held"]
    assert unco_end > coord_end  # the demo's point, measured: uncoordinated still holds memory
    assert any(f"{(unco_end - coord_end) / GiB:.1f} GiB still held" in t.get_text() for t in ax.texts)


def test_demo_figure_refuses_runs_with_different_steps(demo_json: dict[str, Any]) -> None:
    from ramdiscard.cli.plots import demo_figure

    run = demo_json["runs"]["coordinated"]
    other = {"name": "x", "coordinated": False, "region_size": 1, "steps": run["steps"][:-1]}
    with pytest.raises(ValueError, match="different steps"):
        demo_figure([{"name": "c", "coordinated": True, "region_size": 1, "steps": run["steps"]}, other])


def _replay_in_process(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[dict[str, Any], list[Any]]:
    """Run ``ramdiscard replay`` in this process; returns its JSON and the timeline it plotted."""
    import contextlib
    import io

    from ramdiscard.cli import replay as replay_cli
    from ramdiscard.cli.main import main

    seen: list[Any] = []
    real = replay_cli.write_replay_plot

    def spy(timeline: Any, path: Any, *, title: str = "") -> Path:
        seen.extend(timeline)
        return real(timeline, path, title=title)

    monkeypatch.setattr(replay_cli, "write_replay_plot", spy)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["replay", *args, "--json"])
    assert rc == 0
    return json.loads(out.getvalue()), seen


def test_replay_plot_series_and_axes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ramdiscard.cli.plots import replay_figure, replay_points
    from tests.conftest import sample_trace

    png = tmp_path / "replay.png"
    out, timeline = _replay_in_process(monkeypatch, str(sample_trace()), "--plot", str(png))
    assert out["plot"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(p.kind == "request" for p in timeline) == out["requests"]
    points = replay_points(timeline)
    fig = replay_figure(points)
    by_index, by_time, dma_index, dma_time = fig.axes  # 2 x 2, row-major
    assert [ax.get_xlabel() for ax in (dma_index, dma_time)] == ["request index", "trace time (s)"]
    for ax in (by_index, by_time):
        lines = _lines(ax)
        assert {"requested", "plugged", "usable region", "pinned"} <= set(lines)
        assert max(lines["pinned"].get_ydata()) == out["peak_pinned"] / GiB
        assert max(lines["plugged"].get_ydata()) == out["peak_plugged"] / GiB
        assert list(lines["usable region"].get_ydata()) == [p["usable_region"] / GiB for p in points]
    assert list(by_index.get_lines()[0].get_xdata()) == [p["index"] for p in points]
    assert list(by_time.get_lines()[0].get_xdata()) == [p["time"] - points[0]["time"] for p in points]
    for ax in (dma_index, dma_time):
        assert max(_lines(ax)["DMA mappings"].get_ydata()) == out["peak_dma_mappings"]
    kinds = [p["kind"] for p in points]
    for ax in fig.axes:  # every resize and reset is marked in every panel
        marks = [line.get_label() for line in ax.get_lines() if line.get_label() in ("resize", "reset")]
        assert marks.count("resize") == kinds.count("resize") and marks.count("reset") == kinds.count("reset")
    assert kinds.count("reset") >= 1 and kinds.count("resize") >= 1


def test_replay_plot_without_vfio_has_no_pin_series(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ramdiscard.cli.plots import replay_figure, replay_points
    from tests.conftest import sample_trace

    out, timeline = _replay_in_process(
        monkeypatch, str(sample_trace()), "--consumer", "kvm", "--plot", str(tmp_path / "k.png")
    )
    assert out["peak_pinned"] is None and out["memslots"]["peak_kvm_memslots"] is not None
    fig = replay_figure(replay_points(timeline))
    assert "pinned" not in _lines(fig.axes[0]) and "plugged" in _lines(fig.axes[0])
    assert "DMA mappings" not in _lines(fig.axes[2])
    assert any("no vfio consumer" in t.get_text() for t in fig.axes[2].texts)


def test_replay_plot_into_missing_directory_fails_first(tmp_path: Path) -> None:
    from tests.conftest import sample_trace

    r = cli("replay", str(sample_trace()), "--plot", str(tmp_path / "nope" / "r.png"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("ramdiscard: error: --plot: directory") and r.stderr.count("\n") == 1
