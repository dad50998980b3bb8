"""``ramdiscard bench``: every benchmark of the project, as ratios against raw baselines.

Each area of the project with a benchmark has a module in :mod:`ramdiscard.bench` with
``run(quick) -> list[dict]`` (:data:`BENCH_MODULES` lists every one); a row has ``group``,
``name``, ``ours_ns``, ``raw_ns`` and ``ratio`` (ours / raw, both measured in this run),
and optionally a ``target`` ratio and extra figures. A row without ``group`` gets its
area's name (``ramdiscard.bench.<area>``).

Targets (ratio, at most): hostmem populate/discard 1.1 from 2 MiB chunks; virtio_mem
plug/unplug cost at 4 TiB vs 16 GiB 1.1; vfio plug 1.15, unplug 1.25; migration 1.3 (TCP
vs raw copy) and 1.2 (1 TiB vs 4 GiB region); guest driver 3.0.
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
]


def collect(quick: bool = False, only: list[str] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in BENCH_MODULES:
        if only and not any(o in name for o in only):
            continue
        module = importlib.import_module(name)
        area = name.rsplit(".", 1)[1]
        for row in module.run(quick=quick):
            rows.append({"group": area, **row} if not row.get("group") else row)
    return rows


def render(rows: list[dict[str, Any]], as_json: bool) -> str:
    if as_json:
        return json.dumps(rows, indent=2, default=str)
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    table = Table(title="ramdiscard benchmarks (ratio = ours / raw baseline, same run)")
    for col in ("group", "benchmark", "ours", "raw", "ratio", "target", "notes"):
        table.add_column(col, justify="right" if col in ("ours", "raw", "ratio", "target") else "left")
    for r in rows:
        target = r.get("target")
        ratio = r.get("ratio")
        ok = "" if target is None or ratio is None else (" ok" if ratio <= target else " MISS")
        notes = ", ".join(
            f"{k}={_fmt(v)}"
            for k, v in r.items()
            if k not in ("group", "name", "ours_ns", "raw_ns", "ratio", "target") and v is not None
        )
        table.add_row(
            str(r.get("group", "")),
            str(r.get("name", "")),
            _ns(r.get("ours_ns")),
            _ns(r.get("raw_ns")),
            "" if ratio is None else f"{ratio:.3f}",
            "" if target is None else f"<= {target}{ok}",
            notes,
        )
    buf = StringIO()
    Console(file=buf, width=200).print(table)
    return buf.getvalue()


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
