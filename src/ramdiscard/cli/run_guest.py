"""``ramdiscard run GUEST.toml`` for a real-guest scenario (a file with ``[guest]``): boot
the guest, play the steps and print, per step, the guest's MemTotal, the device's plugged
size, the consumer's VmPin and the device region's resident bytes in the memfd. A missing
QEMU build ends with the one-line error of :func:`~ramdiscard.realguest.qemu.find_qemu`
before anything starts; a guest image that cannot be fetched or built, with
:class:`~ramdiscard.realguest.guestimage.GuestImageError`'s, before QEMU starts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ramdiscard.machine.scenario import GuestScenario
from ramdiscard.units import format_size

_COLUMNS = (
    ("requested", "requested"), ("guest_memtotal", "guest MemTotal"), ("plugged", "plugged"),
    ("vm_pin", "VmPin"), ("resident", "memfd resident"),
)  # fmt: skip


def run_guest_scenario_cli(sc: GuestScenario, args: argparse.Namespace) -> int:
    from ramdiscard.realguest.qemu import find_qemu
    from ramdiscard.realguest.scenario import GuestStepResult, run_guest_scenario

    find_qemu()  # the one-line error naming the missing build, before anything is started
    rows: list[dict[str, Any]] = []

    def on_step(r: GuestStepResult) -> None:
        s = r.sizes
        row = {
            "step": r.label, "requested": r.requested, "guest_memtotal": s.guest_memtotal,
            "plugged": s.plugged, "pinned": s.pinned, "vm_pin": s.vm_pin, "resident": s.resident,
            "seconds": round(r.seconds, 3), "notes": list(r.notes),
        }  # fmt: skip
        rows.append(row)
        if not args.json and not args.quiet:
            print(f"{sc.name}: {r.label}: done in {r.seconds:.1f} s", file=sys.stderr, flush=True)

    def echo(line: str) -> None:
        print(f"guest: {line}", file=sys.stderr, flush=True)

    run_guest_scenario(sc, on_step=on_step, on_console=echo if args.console else None)
    if args.json:
        print(json.dumps({"scenario": sc.name, "real_guest": True, "steps": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 110))
    title = f"{sc.name}" + (f": {sc.description}" if sc.description else "") + " (real guest)"
    t = Table(title=title, title_justify="left")
    t.add_column("step")
    for _, head in _COLUMNS:
        t.add_column(head, justify="right")
    t.add_column("time", justify="right")
    for row in rows:
        cells = [f"{row[k] >> 10} kB" if k == "guest_memtotal" else format_size(row[k]) for k, _ in _COLUMNS]
        t.add_row(row["step"], *cells, f"{row['seconds']:.1f} s")
    console.print(t)
    for row in rows:
        for note in row["notes"]:
            console.print(f"note ({row['step']}): {note}")
    sys.stdout.flush()
    return 0
