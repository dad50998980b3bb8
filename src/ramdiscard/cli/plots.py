"""The command line's pictures: the demo's comparison and a replayed trace.

Figures are built from figures already measured (nothing is computed here beyond unit
conversion) as :class:`matplotlib.figure.Figure` objects without pyplot, so building one
touches no global state; :func:`save_png` writes one through
:func:`ramdiscard.fileio.create_output` (the file appears whole or not at all).
matplotlib comes with the ``cli`` extra and is imported only when a figure is built.

Series carry their meaning in their ``label`` (``"held by the VM: coordinated"``,
``"pinned"``, ...) and their values in GiB (DMA mappings: a count), so a test can read
a figure back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ramdiscard.fileio import check_output, create_output
from ramdiscard.units import GiB, format_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ramdiscard.replay.trace import ReplayPoint

# Colours per run, so "coordinated" looks the same in every panel.
_COORD = "tab:green"
_UNCOORD = "tab:red"
_PLUGGED = "tab:blue"


def _gib(values: Sequence[float]) -> list[float]:
    return [v / GiB for v in values]


def demo_figure(runs: Sequence[Mapping[str, Any]], *, pin_key: str = "vm_pin") -> Figure:
    """The demo's comparison: one panel, x = the demo's steps (``boot``, ``-> 4G``, ...),
    y = GiB, for every run (``{"name", "coordinated", "region_size", "steps"}``, steps as
    the demo's rows). Series: plugged (the guest's view, the same in both runs and equal
    to the requested size at each step's end), then per run "held by the VM" and the
    pinned memory (``pin_key``: ``vm_pin`` or ``vm_lck``), all at the end of each step;
    the gap between the held lines is shaded. Runs must have the same steps (ValueError otherwise)."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no run to plot")
    labels = [row["step"] for row in runs[0]["steps"]]
    for run in runs[1:]:
        if [row["step"] for row in run["steps"]] != labels:
            raise ValueError("runs with different steps cannot share a step axis")
    x = list(range(len(labels)))
    fig = Figure(figsize=(9.5, 5.2))
    ax = fig.add_subplot()
    first = runs[0]["steps"]
    ax.plot(x, _gib([r["plugged"] for r in first]), color=_PLUGGED, marker="s", markersize=4,
            label="plugged by the guest (= requested)")  # fmt: skip
    held: dict[bool, list[float]] = {}
    pin_name = "VmPin" if pin_key == "vm_pin" else "VmLck"
    for run in runs:
        coord = bool(run["coordinated"])
        name = "coordinated" if coord else "uncoordinated"
        colour = _COORD if coord else _UNCOORD
        region = format_size(int(run["region_size"]))
        held[coord] = _gib([r["held"] for r in run["steps"]])
        ax.plot(x, held[coord], color=colour, marker="o", linewidth=2.5,
                label=f"held by the VM: {name} ({region} region)")  # fmt: skip
        ax.plot(x, _gib([r[pin_key] for r in run["steps"]]), color="black", linestyle=":", marker=".",
                linewidth=1.2, zorder=3, label=f"{pin_name}: {name}")  # fmt: skip
    if True in held and False in held:
        ax.fill_between(x, held[True], held[False], color=_UNCOORD, alpha=0.12, linewidth=0,
                        label="held without need")  # fmt: skip
        gap = held[False][-1] - held[True][-1]
        if gap > 0:
            ax.annotate(
                f"{gap:.1f} GiB still held\nafter unplugging all",
                xy=(x[-1], (held[False][-1] + held[True][-1]) / 2),
                xytext=(-12, 0), textcoords="offset points", ha="right", va="center",
            )  # fmt: skip
    ax.set_xticks(x, labels)
    ax.set_xlabel("demo step (figures at the end of each step; time per step: see the table)")
    ax.set_ylabel("GiB")
    top = max(max(v) for v in held.values()) if held else 1.0
    ax.set_ylim(0, top * 1.45)  # room for the legend above the lines
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small", ncols=2)
    ax.set_title("virtio-mem + DMA pinning: memory the VM holds, with and without coordination")
    fig.tight_layout()
    return fig


def replay_figure(points: Sequence[Mapping[str, Any]], *, title: str = "") -> Figure:
    """A replayed trace: a 2 x 2 grid, columns x = request index and x = trace time (s
    since the first point), rows sizes in GiB (requested, plugged, usable region,
    pinned) and DMA mappings. ``points`` are dicts with ``index``, ``time``, ``kind``
    (``request``, ``resize`` or ``reset``), ``requested``, ``plugged``,
    ``usable_region`` and optionally ``pinned`` and ``dma_mappings`` (None: no such
    consumer, the series is left out). Resizes are dashed vertical lines, resets solid
    ones, in every panel."""
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("the trace has no request and no resize to plot")
    fig = Figure(figsize=(12, 6.5))
    axes = fig.subplots(2, 2, sharex="col")
    t0 = points[0]["time"]
    xs = {"index": [p["index"] for p in points], "time": [p["time"] - t0 for p in points]}
    # (key, label, colour, style, width): pinned often equals plugged, so it is dashed over a wide line
    sizes = (
        ("requested", "requested", "0.5", "-", 1.5),
        ("plugged", "plugged", _PLUGGED, "-", 3.5),
        ("usable_region", "usable region", "tab:purple", "-", 1.5),
        ("pinned", "pinned", "tab:orange", "--", 1.5),
    )
    has = {k: any(p.get(k) is not None for p in points) for k in ("pinned", "dma_mappings")}
    for col, key in enumerate(("index", "time")):
        x = xs[key]
        top, bottom = axes[0][col], axes[1][col]
        for series, label, colour, style, width in sizes:
            if series in has and not has[series]:
                continue
            top.step(x, _gib([p.get(series) or 0 for p in points]), where="post", label=label, color=colour,
                     linestyle=style, linewidth=width, alpha=0.6 if series == "plugged" else 1.0)  # fmt: skip
        if has["dma_mappings"]:
            bottom.step(x, [p.get("dma_mappings") or 0 for p in points], where="post", color="tab:orange",
                        label="DMA mappings")  # fmt: skip
        else:
            bottom.text(0.5, 0.5, "no vfio consumer: no DMA mappings", transform=bottom.transAxes,
                        ha="center", va="center", color="0.4")  # fmt: skip
        for ax in (top, bottom):
            for p, xv in zip(points, x, strict=True):
                if p["kind"] == "resize":
                    ax.axvline(xv, color="0.55", linestyle="--", linewidth=0.8, label="resize")
                elif p["kind"] == "reset":
                    ax.axvline(xv, color="black", linewidth=1.2, label="reset")
            ax.grid(alpha=0.3)
        top.set_ylabel("GiB")
        bottom.set_ylabel("DMA mappings")
        bottom.set_xlabel("request index" if key == "index" else "trace time (s)")
        handles, labels = top.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        top.legend(unique.values(), unique.keys(), loc="upper left", fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_png(fig: Figure, path: str | Path, what: str) -> Path:
    """Write ``fig`` as a PNG at ``path`` (``what`` names the option in errors). Raises
    ValueError if the directory does not exist, FileRefused/OSError from
    :func:`~ramdiscard.fileio.create_output`."""
    target = Path(path)
    check_plot_path(target, what)
    with create_output(target, what, durable=False) as f:
        fig.savefig(f, format="png", dpi=100)
    return target


def check_plot_path(path: str | Path, what: str = "--plot") -> None:
    """Refuse a plot path before any work: ValueError if its directory does not exist,
    FileRefused if it may not be replaced (:func:`~ramdiscard.fileio.check_output`)."""
    target = Path(path)
    if not target.parent.is_dir():
        raise ValueError(f"{what}: directory {str(target.parent)!r} does not exist")
    check_output(target, what)


def replay_points(timeline: Sequence[ReplayPoint]) -> list[dict[str, Any]]:
    """:attr:`ReplayReport.timeline <ramdiscard.replay.trace.ReplayReport.timeline>` as
    the dicts :func:`replay_figure` takes."""
    return [
        {"index": p.index, "time": p.timestamp, "kind": p.kind, "requested": p.requested,
         "plugged": p.plugged, "usable_region": p.usable_region, **p.extra}
        for p in timeline
    ]  # fmt: skip


def write_replay_plot(timeline: Sequence[ReplayPoint], path: str | Path, *, title: str = "") -> Path:
    """Draw a replay's timeline (:func:`replay_figure`) into the PNG ``path``."""
    return save_png(replay_figure(replay_points(timeline), title=title), path, "--plot")
