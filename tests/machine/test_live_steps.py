"""Scenario step ``live-migrate``: precopy to a fresh machine with the guest writing, a
resize meanwhile, digests compared; its keys validated; the example run end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.hostmem import uffd
from ramdiscard.machine import Action, Machine, ScenarioError, parse_scenario, scenario_from_dict
from ramdiscard.units import MiB

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "live-migration.toml"
BOOT = 16 * MiB

live_only = pytest.mark.skipif(uffd.available() is not None, reason=f"no WP_ASYNC: {uffd.available()}")

SCENARIO = """
name = "live"
boot-ram = "16M"
[[devices]]
id = "vmem0"
size = "512M"
backing = "memfd"
[[consumers]]
type = "vfio"
backend = "auto"
[workload]
touch = 0.25
write-rate = "20M"
[[steps]]
requested-size = "64M"
[[steps]]
action = "live-migrate"
downtime-limit = 50
[[steps]]
action = "live-migrate"
requested-size = "192M"
downtime-limit = 20
max-bandwidth = "1G"
[[steps]]
action = "migrate"
transport = "tcp"
"""


@live_only
def test_live_migrate_steps_with_the_writer_and_a_resize_meanwhile() -> None:
    sc = parse_scenario(SCENARIO)
    assert [s.action for s in sc.steps] == [
        Action.RESIZE, Action.LIVE_MIGRATE, Action.LIVE_MIGRATE, Action.MIGRATE
    ]  # fmt: skip
    m = Machine.from_scenario(sc)
    machines = [m]
    seen: list[tuple[str, int]] = []
    m.on_migration = lambda st: seen.append((st.status, st.rounds))
    try:
        m.run_step(sc.steps[0], 0)
        first = m.run_step(sc.steps[1], 1)
        assert seen[0] == ("active", 0) and seen[-1] == ("completed", first.details["rounds"])
        assert [r for _s, r in seen[1:-1]] == list(range(1, first.details["rounds"] + 1))
        assert first.machine is not None and first.machine is not m
        m = first.machine
        machines.append(m)
        d = first.details
        assert d["digests_equal"] and d["writer"]
        assert d["plugged_before"] == d["plugged_at_switchover"] == d["destination_plugged"] == 64 * MiB
        assert d["populated"] == BOOT + 64 * MiB
        assert d["rounds"] >= 1 and len(d["round_bytes"]) == d["rounds"] + 1 == d["received_rounds"] + 1
        assert d["transferred"] >= d["page_bytes"] >= d["populated"]
        assert any("digests equal on both ends" in n for n in first.notes)
        assert not machines[0].running  # the source was closed
        seen.clear()
        second = m.run_step(sc.steps[2], 2)
        assert seen and seen[-1][0] == "completed"  # the hook went over to the destination
        assert second.machine is not None
        m = second.machine
        machines.append(m)
        d = second.details
        assert d["resized_after_round"] == 0 and d["digests_equal"]
        assert d["plugged_at_switchover"] == d["destination_plugged"] > 64 * MiB
        # the 128 MiB plugged during the migration went in the live rounds, not at the switchover
        assert d["round_bytes"][-1] < 128 * MiB, d["round_bytes"]
        st = m.status()
        assert st["plugged"] == st["requested"] == 192 * MiB == m.drivers["vmem0"].plugged_size
        if st["pinned"]:
            assert st["pinned"] == BOOT + 192 * MiB
        assert m.workload is not None
        assert not m.running  # the mode of the source before the step
        # chunks the writer overwrote are the writer's now: a later integrity check holds
        assert m.workload.verify() == []
        third = m.run_step(sc.steps[3], 3)
        assert third.machine is not None
        machines.append(third.machine)
    finally:
        for x in machines:
            x.close()


VALID = tomllib.loads(SCENARIO)


def _step(**kw: Any) -> dict[str, Any]:
    data = tomllib.loads(SCENARIO)
    data["steps"] = [{"action": "live-migrate", **kw}]
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_step(**{"downtime-limit": -1}), "steps[0].downtime-limit: must be an integer of milliseconds"),
        (_step(**{"downtime-limit": 2.5}), "steps[0].downtime-limit: must be an integer of milliseconds"),
        (_step(**{"downtime-limit": True}), "steps[0].downtime-limit: must be an integer of milliseconds"),
        (_step(**{"max-bandwidth": "fast"}), 'steps[0].max-bandwidth: must be a size like "2M"'),
        (_step(**{"requested-size": "3M"}), "steps[0].requested-size: must be a multiple"),
        (_step(**{"requested-size": {"nope": "2M"}}), 'steps[0].requested-size.nope: unknown device "nope"'),
        (_step(transport="tcp"), 'steps[0].transport: not valid for action "live-migrate"'),
        (_step(seconds=1), 'steps[0].seconds: not valid for action "live-migrate"'),
        (_step(speed=1), "steps[0]"),
        ({**tomllib.loads(SCENARIO), "steps": [{"action": "resize", "downtime-limit": 5}]},
         'steps[0].downtime-limit: not valid for action "resize"'),
    ],
)  # fmt: skip
def test_bad_live_migrate_keys_give_one_line(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as exc:
        scenario_from_dict(data, source="s.toml")
    text = str(exc.value)
    assert text.startswith(f"s.toml: {message}"), text
    assert "\n" not in text


def test_live_migrate_needs_a_fresh_destination(tmp_path: Path) -> None:
    data = _step()
    data["devices"][0].update({"backing": "file", "path": str(tmp_path / "m.mem")})
    with pytest.raises(ScenarioError, match=r'steps\[0\].action: "live-migrate" needs a fresh destination'):
        scenario_from_dict(data, source="s.toml")


def test_bad_step_in_a_file_starts_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(SCENARIO.replace("downtime-limit = 50", 'downtime-limit = "50ms"'))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "run", str(bad), "--workdir", str(tmp_path / "w")],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"ramdiscard: error: {bad.name}: steps[1].downtime-limit: must be an integer of milliseconds in "
        '[0, 2000000], got "50ms"'
    ]
    assert not (tmp_path / "w").exists()


@live_only
def test_example_runs_end_to_end() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    r = subprocess.run(
        [sys.executable, "-m", "ramdiscard.cli.main", "run", str(EXAMPLE), "--json", "--quiet"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    steps = out["steps"]
    live = [s for s in steps if s["details"].get("digests_equal")]
    assert len(live) == 2
    assert all(any("digests equal on both ends" in n for n in s["notes"]) for s in live)
    grow = live[1]["details"]
    assert grow["resized_after_round"] == 0
    assert grow["destination_plugged"] == grow["plugged_at_switchover"] > grow["plugged_before"]
    assert steps[-1]["plugged"] == out["final"]["plugged"] == 256 * MiB
    boot = 64 * MiB
    if out["final"]["pinned"]:
        assert out["final"]["vm_pin"] == out["final"]["pinned"] == boot + 256 * MiB


@live_only
def test_a_failed_check_of_both_ends_leaves_the_source_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """The transfer succeeds, the comparison of both ends fails: MigrationError, and the
    source runs on (guest thread started again) and still follows requested-size."""
    import ramdiscard.machine.live as live
    from ramdiscard.machine.checkpoint import fingerprint as real
    from ramdiscard.migration import MigrationError

    def differs(m: Any) -> Any:
        got = real(m)
        return {**got, "tampered": "yes"} if m is not source else got

    monkeypatch.setattr(live, "fingerprint", differs)
    source = Machine.from_scenario(parse_scenario(SCENARIO))
    try:
        source.set_requested_size("vmem0", 64 * MiB)
        source.start()
        assert source.wait_converged(timeout=60)
        with pytest.raises(MigrationError, match="destination's memory differs"):
            source.live_migrate(downtime_limit_ms=50)
        assert source.running
        source.set_requested_size("vmem0", 128 * MiB)
        assert source.wait_converged(timeout=60)
        assert source.devices["vmem0"].plugged_size == 128 * MiB
    finally:
        source.close()


@live_only
def test_a_machine_migrated_by_file_keeps_reporting_live_migration_progress() -> None:
    """``on_migration`` follows the machine through a stop-and-copy migration, so a later
    live migration of the destination still reports its progress."""
    seen: list[str] = []
    m = Machine.from_scenario(parse_scenario(SCENARIO))
    try:
        m.on_migration = lambda st: seen.append(st.status)
        m.set_requested_size("vmem0", 64 * MiB)
        m.run_guest()
        dest, _ = m.migrate("file")
        m = dest
        assert seen == []
        m, _ = m.live_migrate(downtime_limit_ms=50)
        assert "active" in seen and seen[-1] == "completed"
    finally:
        m.close()
