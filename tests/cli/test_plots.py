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
