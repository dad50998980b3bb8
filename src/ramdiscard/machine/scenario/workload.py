"""The ``[workload]`` table: what the guest does with its plugged memory.

Rules: ``touch`` is a number in [0, 1] (fraction of plugged memory written);
``write-rate`` a size per second (0: no writer thread); ``write-pattern`` one of random,
hot, sequential; ``hot-set`` a size, a multiple of 4K.
"""

from __future__ import annotations

import math

from ramdiscard.machine.scenario.fields import Reader, show
from ramdiscard.machine.scenario.model import WorkloadSpec
from ramdiscard.units import MiB

PATTERNS = ("random", "hot", "sequential")


def read_workload(r: Reader, raw: object, key: str = "workload") -> WorkloadSpec:
    """The ``[workload]`` table at ``key``; see the module rules."""
    tbl = r.table(raw, key)
    r.keys(tbl, key, ("touch", "write-rate", "write-pattern", "hot-set"))
    touch = tbl.get("touch", 0.0)
    if (
        isinstance(touch, bool)
        or not isinstance(touch, (int, float))
        or not 0 <= touch <= 1
        or (isinstance(touch, float) and math.isnan(touch))
    ):
        raise r.fail(f"{key}.touch", f"must be a number in [0, 1], got {show(touch)}")
    rate = r.size(tbl.get("write-rate", 0), f"{key}.write-rate")
    pattern = tbl.get("write-pattern", "random")
    if pattern not in PATTERNS:
        raise r.fail(f"{key}.write-pattern", f"must be one of {', '.join(PATTERNS)}, got {show(pattern)}")
    hot = r.size(tbl.get("hot-set", 64 * MiB), f"{key}.hot-set")
    if hot % 4096:
        raise r.fail(f"{key}.hot-set", f"must be a multiple of 4K, got {show(tbl.get('hot-set'))}")
    return WorkloadSpec(touch=float(touch), write_rate=rate, write_pattern=pattern, hot_set=hot)
