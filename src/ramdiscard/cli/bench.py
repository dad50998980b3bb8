"""``ramdiscard bench``: every benchmark of the project, as ratios against raw baselines.

Each area of the project with a benchmark has a module in :mod:`ramdiscard.bench` with
``run(quick) -> list[dict]`` (:data:`BENCH_MODULES` lists every one); a row has ``group``,
``name``, ``ours_ns`` and at least one baseline measured in the same run: ``raw_ns`` (the
same work as raw calls from Python) and/or ``c_ns`` (the C floor, :mod:`ramdiscard.bench.cfloor`).
``ratio`` is ours over the row's baseline, named by ``vs`` (``"C"`` or ``"raw"``; ``raw``
when absent), ``target`` its limit; ``target_ns_per_run`` is an absolute limit instead.
Extra keys are figures shown as notes. A row without ``ours_ns`` is a note (``notes``),
e.g. why a C floor was skipped. A row without ``group`` gets its area's name
(``ramdiscard.bench.<area>``).

Targets (ratio, at most): hostmem populate/discard 1.1 from 2 MiB chunks; virtio_mem
plug/unplug cost at 4 TiB vs 16 GiB 1.1; vfio plug 1.15, unplug 1.25; migration 1.3 (TCP
vs raw copy) and 1.2 (1 TiB vs 4 GiB region); guest driver 3.0; postcopy fault latency
p99 5 ms (absolute).
"""

from __future__ import annotations

import importlib
import json
from typing import Any

BENCH_MODULES = [
    "ramdiscard.bench.rdm",
    "ramdiscard.bench.hostmem",
    "ramdiscard.bench.virtio_mem",
    "ramdiscard.bench.vfio",
    "ramdiscard.bench.guest",
    "ramdiscard.bench.migration",
    "ramdiscard.bench.postcopy",
]
HELPER_MODULES = [
    "ramdiscard.bench.cfloor",
    "ramdiscard.bench.migration_guest",
    "ramdiscard.bench.migration_precopy",
    "ramdiscard.bench.migration_snapshot",
]
"""Modules of :mod:`ramdiscard.bench` that are no benchmark (shared machinery)."""


def collect(quick: bool = False, only: list[str] | None = None) -> list[dict[str, Any]]:
    """Every selected group's rows, in :data:`BENCH_MODULES` order. A group whose ``run``
    raises gives one row ``{"group": area, "name": area, "failed": "<error>"}`` in its
    place; the other groups still run."""
    rows: list[dict[str, Any]] = []
    for name in BENCH_MODULES:
        if only and not any(o in name for o in only):
            continue
        area = name.rsplit(".", 1)[1]
        try:
            got = importlib.import_module(name).run(quick=quick)
        except Exception as exc:
            rows.append({"group": area, "name": area, "failed": f"{type(exc).__name__}: {exc}"})
            continue
        for row in got:
            rows.append({"group": area, **row} if not row.get("group") else row)
    return rows


def failed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of groups that raised (see :func:`collect`)."""
    return [r for r in rows if r.get("failed")]


_COLUMNS = ("group", "name", "ours_ns", "c_ns", "raw_ns", "ratio", "vs", "target", "target_ns_per_run")


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="ramdiscard benchmarks (ours against the C floor and raw Python calls, same run)")
    for col in ("group", "benchmark", "ours", "C floor", "ours/C", "raw (py)", "ours/raw", "target", "notes"):
        numeric = col in ("ours", "C floor", "ours/C", "raw (py)", "ours/raw", "target")
        table.add_column(col, justify="right" if numeric else "left")
    for r in rows:
        ours, c, raw = r.get("ours_ns"), r.get("c_ns"), r.get("raw_ns")
        notes = ", ".join(f"{k}={_fmt(v)}" for k, v in r.items() if k not in _COLUMNS and v is not None)
        table.add_row(
            str(r.get("group", "")),
            str(r.get("name", "")),
            _ns(ours),
            _ns(c),
            _ratio(ours, c),
            _ns(raw),
            _ratio(ours, raw) if ours is not None else _fmt_ratio(r.get("ratio")),
            target_text(r),
            notes,
        )
    buf = StringIO()
    Console(file=buf, width=240).print(table)
    return buf.getvalue()


def target_text(row: dict[str, Any]) -> str:
    """The row's target and whether it was met: ``<= 1.25x C ok``, ``<= 1.5 µs/run MISS``."""
    per_run = row.get("target_ns_per_run")
    if per_run is not None:
        got = row.get("ns_per_run")
        ok = "" if not isinstance(got, (int, float)) else (" ok" if got <= per_run else " MISS")
        return f"<= {_ns(per_run)}/run{ok}"
    target, ratio = row.get("target"), row.get("ratio")
    if target is None:
        return ""
    ok = "" if ratio is None else (" ok" if ratio <= target else " MISS")
    return f"<= {target}x {row.get('vs', 'raw')}{ok}"


def _fmt_ratio(v: object) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else ""


def _ratio(a: object, b: object) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return f"{a / b:.2f}"
    return ""


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _ns(v: object) -> str:
    if not isinstance(v, (int, float)):
        return ""
    if v >= 1e9:
        return f"{v / 1e9:.2f} s"
    if v >= 1e6:
        return f"{v / 1e6:.2f} ms"
    if v >= 1e3:
        return f"{v / 1e3:.1f} µs"
    return f"{v:.0f} ns"
