"""``ramdiscard demo``: what coordinating discards with DMA pinning buys, on real memory.

The scenario: boot RAM plus a virtio-mem region (2 MiB blocks, anonymous THP memory), a
vfio-style container pinning guest memory for DMA (io_uring fixed buffers: real page
pins, counted in VmPin), and the Linux driver model following requested sizes
0 -> 4G -> 1G -> 6G -> 0 while a workload writes into part of the plugged memory.

It runs twice: with the container listening to the RamDiscardManager (pins follow
plugged memory) and without (the container pins whole regions, as a VMM unaware of
virtio-mem would; memory the guest unplugs is discarded but stays pinned, so nothing is
given back). Every figure is measured in this process (/proc/self/status, mincore,
the backend's own count); nothing is computed from the plan.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramdiscard.consumers.dma import iouring_available
from ramdiscard.guest import Exchange
from ramdiscard.machine import Machine, Scenario, StepResult, scenario_from_dict
from ramdiscard.units import GiB, MiB, format_size

DEMO_STEPS_16G = (4 * GiB, 1 * GiB, 6 * GiB, 0)
SAFETY_MARGIN = 1 * GiB


@dataclass
class Run:
    name: str
    coordinated: bool
    region_size: int
    steps: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[dict[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def scaled_steps(region_size: int, block_size: int) -> list[int]:
    """The demo's requested sizes for a region of ``region_size`` (16G: 4G, 1G, 6G, 0)."""
    out = []
    for s in DEMO_STEPS_16G:
        v = s * region_size // (16 * GiB)
        out.append(v - v % block_size)
    return out


def build_scenario(
    *, region_size: int, boot_ram: int, block_size: int, backend: str, coordinated: bool,
    touch: float, steps: list[int],
) -> Scenario:  # fmt: skip
    data: dict[str, Any] = {
        "name": "demo-" + ("coordinated" if coordinated else "uncoordinated"),
        "boot-ram": boot_ram,
        "devices": [{"id": "vmem0", "size": region_size, "block-size": block_size, "backing": "anonymous"}],
        "consumers": [
            {"type": "vfio", "id": "vfio0", "backend": backend, "coordinate-discards": coordinated}
        ],
        "workload": {"touch": touch},
        "steps": [{"requested-size": s} for s in steps],
    }
    return scenario_from_dict(data, source="demo")


def _row(label: str, seconds: float, requests: int, st: dict[str, Any]) -> dict[str, Any]:
    keys = ("requested", "plugged", "guest_touched", "resident", "held", "rss", "vm_pin", "vm_lck",
            "pinned", "stale_pinned", "dma_mappings")  # fmt: skip
    row: dict[str, Any] = {"step": label, "seconds": round(seconds, 3), "requests": requests}
    row.update({k: st[k] for k in keys})
    return row


def run_one(sc: Scenario, run: Run, progress: Any) -> None:
    t_start = time.monotonic()
    last = [0.0]
    task = progress.add_task(run.name, total=len(sc.steps) + 1, detail="building")
    run.timeline.append(
        {"t": 0.0, "plugged": 0.0, "rss": 0.0, "vm_pin": 0.0, "vm_lck": 0.0, "dma_mappings": 0.0, "held": 0.0}
    )
    machine = Machine.from_scenario(sc)
    try:
        run.notes.extend(machine.notes)

        def sample(force: bool = False) -> None:
            now = time.monotonic()
            if force or now - last[0] >= 0.05:
                last[0] = now
                s = machine.sample()
                point = {"t": round(now - t_start, 4), **{k: float(v) for k, v in s.items()}}
                if force:  # "held" needs a residency scan of all guest RAM: step ends only
                    point["held"] = float(machine.status()["held"])
                run.timeline.append(point)
                progress.update(
                    task,
                    detail=f"plugged {format_size(s['plugged'])}  VmPin {format_size(s['vm_pin'])}  "
                    f"RSS {format_size(s['rss'])}",
                )

        def on_request(_dev: str, _ex: Exchange) -> None:
            sample()

        boot_s = time.monotonic() - t_start
        sample(True)
        run.steps.append(_row("boot", boot_s, 0, machine.status()))
        progress.advance(task)
        for i, step in enumerate(sc.steps):
            progress.update(task, description=f"{run.name}: {step.describe()}")
            res: StepResult[Machine] = machine.run_step(step, i, on_request=on_request)
            sample(True)
            run.steps.append(
                _row(step.describe().replace("vmem0 -> ", "-> "), res.seconds, res.requests, res.status)
            )
            run.notes.extend(res.notes)
            progress.advance(task)
    finally:
        machine.close()
        run.seconds = time.monotonic() - t_start
        progress.update(task, detail=f"done in {run.seconds:.1f} s")


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    region = args.region_size
    block = args.block_size
    boot = args.boot_ram
    if region % block or region < 128 * MiB:
        raise ValueError(
            f"--region-size must be a multiple of --block-size and at least 128M, got {format_size(region)}"
        )
    notes: list[str] = []
    backend = args.backend
    if backend in ("auto", "io_uring"):
        ok, why = iouring_available()
        if not ok:
            if backend == "io_uring":
                raise ValueError(f"io_uring unusable: {why}")
            notes.append(
                f"io_uring unusable ({why}): pinning with mlock, figures show VmLck instead of VmPin"
            )
            backend = "mlock"
        else:
            backend = "io_uring"
    steps = scaled_steps(region, block)
    if region != 16 * GiB:
        notes.append(
            f"region scaled to {format_size(region)}: requested sizes "
            + ", ".join(format_size(s) for s in steps)
        )

    available = mem_available()
    coord_need = boot + max(steps)
    if coord_need + SAFETY_MARGIN > available:
        raise ValueError(
            f"not enough free memory: the coordinated run needs {format_size(coord_need)}, "
            f"{format_size(available)} available"
        )
    unco_region = region
    unco_steps = steps
    if not args.skip_uncoordinated:
        need = boot + region
        if need + SAFETY_MARGIN > available:
            fit = (available - SAFETY_MARGIN - boot) // GiB * GiB
            if fit < max(steps) or fit < GiB:
                notes.append(
                    "uncoordinated run skipped: it pins the whole region "
                    f"({format_size(need)} with boot RAM), "
                    f"only {format_size(available)} available"
                )
                args.skip_uncoordinated = True
            else:
                unco_region = fit
                notes.append(
                    f"uncoordinated run scaled down to a {format_size(fit)} region: pinning the whole "
                    f"{format_size(region)} region (+ boot RAM) needs {format_size(need)}, only "
                    f"{format_size(available)} available (same requested sizes)"
                )

    runs = [Run("coordinated", True, region)]
    if not args.skip_uncoordinated:
        runs.append(Run("uncoordinated", False, unco_region))
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}"),
        console=console,
        transient=args.json,
        disable=args.quiet,
    ) as progress:
        for run in runs:
            sc = build_scenario(
                region_size=run.region_size, boot_ram=boot, block_size=block, backend=backend,
                coordinated=run.coordinated, touch=args.touch,
                steps=unco_steps if not run.coordinated else steps,
            )  # fmt: skip
            run_one(sc, run, progress)

    for run in runs:
        boot_row = run.steps[0] if run.steps else None
        if boot_row and not run.coordinated and boot_row["seconds"] > 0 and backend != "null":
            rate = boot_row["pinned"] / boot_row["seconds"] / GiB
            notes.append(
                f"{run.name}: pinning {format_size(boot_row['pinned'])} at boot took "
                f"{boot_row['seconds']:.1f} s "
                f"({rate:.2f} GiB/s); pinning populates memory, and on a host that reclaims freed guest "
                "memory (free page reporting) that runs at cold-populate speed"
            )
    plot_path = None
    if not args.no_plot:
        plot_path = write_plot(runs, args.plot, backend)
    result = {
        "config": {
            "region_size": region,
            "boot_ram": boot,
            "block_size": block,
            "backend": backend,
            "touch": args.touch,
            "requested_sizes": steps,
        },
        "notes": notes + [n for r in runs for n in r.notes],
        "runs": {
            r.name: {
                "region_size": r.region_size,
                "seconds": round(r.seconds, 3),
                "steps": r.steps,
                "timeline": r.timeline,
            }
            for r in runs
        },
        "plot": str(plot_path) if plot_path else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result, runs)
    return 0


def print_tables(result: dict[str, Any], runs: list[Run]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    cfg = result["config"]
    console.print(
        f"[bold]virtio-mem {format_size(cfg['region_size'])} region, "
        f"{format_size(cfg['block_size'])} blocks, "
        f"{format_size(cfg['boot_ram'])} boot RAM, vfio-style container pinning with {cfg['backend']}, "
        f"guest writes {cfg['touch']:.0%} of plugged memory[/bold]"
    )
    pin_col = "VmLck" if cfg["backend"] == "mlock" else "VmPin"
    for run in runs:
        title = (
            "coordinated: pins follow plugged memory (RamDiscardListener)"
            if run.coordinated
            else f"uncoordinated: whole {format_size(run.region_size)} region pinned (no RamDiscardManager)"
        )
        t = Table(title=title, title_justify="left")
        for col in (
            "step",
            "plugged",
            "guest-touched",
            "host RSS",
            pin_col,
            "held",
            "DMA mappings",
            "requests",
            "time",
        ):
            t.add_column(col, justify="left" if col == "step" else "right")
        for row in run.steps:
            pin = row["vm_lck"] if cfg["backend"] == "mlock" else row["vm_pin"]
            t.add_row(
                row["step"],
                format_size(row["plugged"]),
                format_size(row["guest_touched"]),
                format_size(row["rss"]),
                format_size(pin),
                format_size(row["held"]),
                str(row["dma_mappings"]),
                str(row["requests"]),
                f"{row['seconds']:.2f} s",
            )
        console.print(t)
    if len(runs) == 2:
        a, b = runs
        peak_a = max(r["held"] for r in a.steps)
        end_a = a.steps[-1]["held"]
        end_b = b.steps[-1]["held"]
        console.print(
            f"After unplugging everything the coordinated VM holds [bold]{format_size(end_a)}[/bold] "
            f"(peak {format_size(peak_a)}); the uncoordinated one still holds "
            f"[bold]{format_size(end_b)}[/bold]: "
            "the guest's unplugged memory was discarded, but its pages stay pinned (stale) and are not freed."
        )
    console.print(
        "[dim]held = resident VM RAM + memory discarded under a still-live pin. RSS is the whole process "
        "(interpreter included); it drops on discard even where the pin keeps the pages.[/dim]"
    )
    for n in result["notes"]:
        console.print(f"note: {n}")
    if result["plot"]:
        console.print(f"plot written to {result['plot']}")


def default_plot_path() -> Path:
    out = Path("out")
    return (out if out.is_dir() else Path(".")) / "ramdiscard-demo.png"


def write_plot(runs: list[Run], path: str | None, backend: str) -> Path:
    """The comparison picture (:func:`ramdiscard.cli.plots.demo_figure`) at ``path``."""
    from ramdiscard.cli.plots import demo_figure, save_png

    fig = demo_figure(
        [{"name": r.name, "coordinated": r.coordinated, "region_size": r.region_size, "steps": r.steps}
         for r in runs],
        pin_key="vm_lck" if backend == "mlock" else "vm_pin",
    )  # fmt: skip
    return save_png(fig, path or default_plot_path(), "--plot")
