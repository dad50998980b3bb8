"""Scenario-file fuzzing: target ``scenario`` (:func:`ramdiscard.machine.scenario.parse_any_scenario`).

Documented outcome: a :class:`Scenario`, a :class:`GuestScenario` or :class:`ScenarioError`
with a one-line message; nothing else for any text. An accepted scenario must satisfy its
own cross-checks (unique ids, non-overlapping device ranges, requested sizes multiples of
the block size and at most the device size; for a real guest also its RAM bounds and
each step's requested size), re-checked here independently.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Hashable
from pathlib import Path

from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.mutate import mutate_text


def _unavailable() -> str | None:
    if importlib.util.find_spec("ramdiscard.machine") is None:
        return "ramdiscard.machine is not on this branch"
    return None


class ScenarioHarness:
    def close(self) -> None:
        pass

    def deep_check(self) -> None:
        pass

    def run(self, data: bytes) -> Hashable:
        from ramdiscard.machine.scenario import GuestScenario, ScenarioError, parse_any_scenario

        text = data.decode("utf-8", errors="replace")
        try:
            sc = parse_any_scenario(text, source="fuzz.toml")
        except ScenarioError as exc:
            msg = str(exc)
            assert "\n" not in msg.strip(), f"multi-line ScenarioError: {msg[:200]!r}"
            return ("error", msg.split(":")[1][:30] if ":" in msg else msg[:30])
        if isinstance(sc, GuestScenario):
            g = sc.guest
            assert g.region_size % g.block_size == 0 and 0 <= g.requested_size <= g.region_size, g
            assert g.requested_size % g.block_size == 0 and 256 << 20 <= g.ram <= 2 << 30, g
            for step in sc.steps:
                req = step.requested_size
                assert req is None or (req % g.block_size == 0 and req <= g.region_size), step
            return ("guest", len(sc.steps))
        ids = [d.id for d in sc.devices]
        assert len(ids) == len(set(ids)), ids
        spans = sorted((d.addr, d.addr + d.size) for d in sc.devices if d.addr is not None)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"overlapping devices accepted: {spans}"
        for d in sc.devices:
            assert d.size % d.block_size == 0 and d.requested_size % d.block_size == 0, d
            assert 0 <= d.requested_size <= d.size, d
        return ("ok", len(sc.devices), len(sc.consumers), len(sc.steps))


def _seeds() -> list[bytes]:
    here = Path(__file__).resolve()
    for parent in here.parents:
        examples = parent / "examples"
        if examples.is_dir() and list(examples.glob("*.toml")):
            return [p.read_bytes() for p in sorted(examples.glob("*.toml"))]
    return [b'[[devices]]\nid = "vmem0"\nsize = "1G"\nrequested-size = "256M"\n']


SCENARIO_TARGET = Target(
    "scenario",
    "scenario TOML files (parse and cross-checks)",
    _seeds,
    ScenarioHarness,
    mutate=mutate_text,
    max_size=8192,
    deep_every=1 << 30,
    unavailable=_unavailable,
)
