"""``ramdiscard run SCENARIO.toml``: build the machine a scenario describes and run its steps
(a real-guest scenario, with ``[guest]``, is played by :mod:`.run_guest`).

Validation errors name the file and the key; the machine is always closed (pins, mappings,
memslots, files released), also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ramdiscard.cli.migrate_live import progress_line
from ramdiscard.guest import Exchange
from ramdiscard.machine import Machine, StepResult, load_scenario
from ramdiscard.machine.scenario import GuestScenario, load_any_scenario
from ramdiscard.migration.precopy import PrecopyStats
from ramdiscard.units import format_size

_COLUMNS = (
    ("requested", "requested"), ("plugged", "plugged"), ("guest_touched", "guest-touched"),
    ("resident", "resident"), ("held", "held"), ("vm_pin", "VmPin"), ("vm_lck", "VmLck"),
    ("dma_mappings", "DMA maps"), ("memslots", "memslots"),
)  # fmt: skip


def _row(res: StepResult[Machine]) -> dict[str, Any]:
    st = res.status
    row: dict[str, Any] = {"step": res.label, "seconds": round(res.seconds, 3), "requests": res.requests}
    row["responses"] = res.responses
    for key, _ in _COLUMNS:
        row[key] = st[key]
    row["mapped_memslots"] = sum(d["mapped-memslots"] for d in st["devices"].values())
    row["notes"] = res.notes
    row["details"] = res.details
    return row


def run_scenario(args: argparse.Namespace) -> int:
    any_sc = load_any_scenario(args.scenario)
    if isinstance(any_sc, GuestScenario):
        if args.check:
            print(f"{any_sc.source}: ok: real guest, {len(any_sc.steps)} step(s)")
            return 0
        from ramdiscard.cli.run_guest import run_guest_scenario_cli

        return run_guest_scenario_cli(any_sc, args)
    sc = any_sc
    if args.check:
        print(
            f"{sc.source}: ok: {len(sc.devices)} device(s), {len(sc.consumers)} consumer(s), "
            f"{len(sc.steps)} step(s)"
        )
        return 0
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    err = Console(stderr=True)
    rows: list[dict[str, Any]] = []
    machine = None
    try:
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("{task.fields[detail]}"),
            console=err, transient=True, disable=args.quiet,
        ) as progress:  # fmt: skip
            task = progress.add_task(f"{sc.name}: building", total=len(sc.steps), detail="")
            machine = Machine.from_scenario(sc, workdir=args.workdir)

            def on_request(dev: str, ex: Exchange) -> None:
                assert machine is not None
                progress.update(
                    task, detail=f"{dev}: {ex}  plugged {format_size(machine.devices[dev].plugged_size)}"
                )

            def on_migration(st: PrecopyStats) -> None:
                progress.update(task, detail=progress_line(st))

            machine.on_migration = on_migration
            for i, step in enumerate(sc.steps):
                progress.update(task, description=f"{sc.name}: {step.describe()}")
                res = machine.run_step(step, i, on_request=on_request)
                machine = res.machine or machine  # a migrate step continues on the destination
                row = _row(res)
                if len(sc.devices) == 1:
                    row["step"] = row["step"].replace(f"{sc.devices[0].id} -> ", "-> ")
                rows.append(row)
                progress.advance(task)
            final = machine.status()
            notes = list(machine.notes)
    finally:
        if machine is not None:
            machine.close()
    if args.json:
        print(json.dumps({"scenario": sc.name, "steps": rows, "final": final, "notes": notes}, indent=2))
        return 0
    _print(sc.name, sc.description, rows, final, notes)
    return 0


def _print(
    name: str, description: str, rows: list[dict[str, Any]], final: dict[str, Any], notes: list[str]
) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    t = Table(title=f"{name}" + (f": {description}" if description else ""), title_justify="left")
    t.add_column("step")
    for _, head in _COLUMNS:
        t.add_column(head, justify="right")
    t.add_column("requests", justify="right")
    t.add_column("time", justify="right")
    for r in rows:
        cells = []
        for key, _ in _COLUMNS:
            v = r[key]
            if v is None:
                cells.append("-")
            elif key in ("dma_mappings", "memslots"):
                cells.append(str(v))
            else:
                cells.append(format_size(v))
        resp = ", ".join(f"{k} {v}" for k, v in sorted(r["responses"].items()) if k != "ack")
        t.add_row(
            r["step"], *cells, f"{r['requests']}" + (f" ({resp})" if resp else ""), f"{r['seconds']:.2f} s"
        )
    console.print(t)
    for c in final["consumers"]:
        if c["type"] == "vfio":
            check = "" if c["dma_limit_check"] else ", check off"
            console.print(
                f"{c['id']}: peak {c['peak_dma_mappings']} DMA mappings of {c['dma_limit']} allowed "
                f"(QEMU worst-case check: {c['worst_case_mappings']}{check}), peak pinned "
                f"{format_size(c['peak_pinned_bytes'])}, refused maps {c['refused_maps']}"
            )
        elif c["type"] == "blockdma":
            modes = ", ".join(f"{k} {v}" for k, v in c.get("modes", {}).items())
            console.print(
                f"{c['id']}: block DMA mapper ({c['backend']}), "
                f"pinned {format_size(c.get('pinned_bytes', 0))}" + (f"; blocks: {modes}" if modes else "")
            )
        else:
            console.print(
                f"{c['id']}: peak {c['peak_memslots']} KVM memslots "
                f"({'real KVM' if c['real_kvm'] else 'model'})"
            )
    for r in rows:
        for n in r["notes"]:
            console.print(f"note ({r['step']}): {n}")
    for n in notes:
        console.print(f"note: {n}")
    sys.stdout.flush()


def run_dump(args: argparse.Namespace) -> int:
    """``ramdiscard dump SCENARIO.toml OUT.elf``: run the steps, then dump."""
    sc = load_scenario(args.scenario)
    machine = Machine.from_scenario(sc, workdir=args.workdir)
    try:
        for i, step in enumerate(sc.steps):
            res = machine.run_step(step, i)
            machine = res.machine or machine
        info = machine.dump(args.output)
        plugged = machine.status()["plugged"]
    finally:
        machine.close()
    if args.json:
        print(json.dumps({"scenario": sc.name, **info, "plugged": plugged}))
    else:
        print(
            f"{info['path']}: {info['segments']} PT_LOAD segments, "
            f"{format_size(info['bytes'])} of guest memory "
            f"(boot RAM + {format_size(plugged)} plugged), file {format_size(info['file_size'])}"
        )
    return 0
