"""Reading a whole scenario: the file, the TOML, the top-level keys, then each table.

Rules: see :mod:`ramdiscard.machine.scenario`. Every function here returns a
:class:`Scenario` or raises :class:`ScenarioError` (one line naming the source and the
key), whatever the file holds.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ramdiscard.machine.scenario.consumers import read_consumers
from ramdiscard.machine.scenario.devices import read_devices
from ramdiscard.machine.scenario.fields import Reader, show
from ramdiscard.machine.scenario.model import Backing, Scenario, ScenarioError
from ramdiscard.machine.scenario.realguest import GuestScenario, is_guest_scenario, read_guest_scenario
from ramdiscard.machine.scenario.steps import read_steps
from ramdiscard.machine.scenario.workload import read_workload
from ramdiscard.units import MiB

TOP_KEYS = ("name", "description", "boot-ram", "boot-backing", "devices", "consumers", "workload", "steps")


def _read(path: str | Path) -> str:
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises ScenarioError (also for I/O errors)."""
    return parse_scenario(_read(path), source=Path(path).name)


def load_any_scenario(path: str | Path) -> Scenario | GuestScenario:
    """Read and validate a scenario file of either kind: a real-guest scenario (it has
    ``[guest]``, :mod:`.realguest`) or a modelled machine. Raises ScenarioError."""
    return parse_any_scenario(_read(path), source=Path(path).name)


def parse_any_scenario(text: str, *, source: str = "<scenario>") -> Scenario | GuestScenario:
    """:func:`load_any_scenario` for TOML text; ``source`` names it in error messages."""
    data = _toml(text, source)
    if is_guest_scenario(data):
        r = Reader(source)
        name = r.string(data.get("name", Path(source).stem), "name")
        return read_guest_scenario(r, data, name)
    return scenario_from_dict(data, source=source)


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    """Validate TOML text; ``source`` names it in error messages."""
    return scenario_from_dict(_toml(text, source), source=source)


def _toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None
    except ValueError as exc:  # tomllib: an integer of more than 4300 digits
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays/tables recursively
        raise ScenarioError(f"{source}: invalid TOML: nested too deeply") from None


def scenario_from_dict(data: Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """Validate an already-parsed mapping (same rules as :func:`parse_scenario`)."""
    r = Reader(source)
    if is_guest_scenario(data):
        raise r.fail("guest", "a real-guest scenario: only `ramdiscard run` plays it")
    r.keys(data, "", TOP_KEYS)
    name = r.string(data.get("name", Path(source).stem), "name")
    description = r.string(data.get("description", ""), "description")
    boot_ram = r.size(data.get("boot-ram", "1G"), "boot-ram")
    if boot_ram % (2 * MiB):
        raise r.fail("boot-ram", f"must be a multiple of 2M, got {show(data.get('boot-ram'))}")
    boot_backing = r.choice(data.get("boot-backing", "anonymous"), "boot-backing", Backing)
    if boot_backing is Backing.FILE:
        raise r.fail("boot-backing", 'must be anonymous or memfd, got "file"')
    if "devices" not in data:
        raise r.fail("devices", "missing: a scenario needs at least one [[devices]] entry")
    devices = read_devices(r, data["devices"], boot_ram)
    consumers = read_consumers(r, data.get("consumers", []))
    workload = read_workload(r, data.get("workload", {}))
    steps = read_steps(r, data.get("steps", []), devices)
    return Scenario(
        name=name,
        description=description,
        devices=devices,
        consumers=consumers,
        steps=steps,
        boot_ram=boot_ram,
        boot_backing=boot_backing,
        workload=workload,
        source=source,
    )
