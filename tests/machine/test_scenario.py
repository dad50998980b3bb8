"""Scenario validation: valid files load; invalid ones give one line naming the key."""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.machine import Action, ScenarioError, load_scenario, parse_scenario, scenario_from_dict
from ramdiscard.units import GiB, MiB

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))

VALID = """
name = "t"
boot-ram = "512M"
[[devices]]
id = "vmem0"
size = "2G"
block-size = "2M"
[[consumers]]
type = "vfio"
backend = "null"
[[consumers]]
type = "kvm"
mode = "model"
[workload]
touch = 0.5
[[steps]]
requested-size = "1G"
[[steps]]
action = "system-reset"
[[steps]]
action = "unplug-all"
device = "vmem0"
[[steps]]
action = "pause"
seconds = 0
"""


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_load(path: Path) -> None:
    sc = load_scenario(path)
    assert sc.devices and sc.steps


def test_valid_scenario() -> None:
    sc = parse_scenario(VALID, source="s.toml")
    d = sc.devices[0]
    assert (d.size, d.block_size, d.addr) == (2 * GiB, 2 * MiB, 4 * GiB)
    assert [s.action for s in sc.steps] == [
        Action.RESIZE,
        Action.SYSTEM_RESET,
        Action.UNPLUG_ALL,
        Action.PAUSE,
    ]
    assert sc.steps[0].requested == (("vmem0", GiB),)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["devices"][0].update({"block-size": "3M"}),
            's.toml: devices[0].block-size: must be a power of two >= 1M, got "3M"',
        ),
        (lambda d: d["devices"][0].update({"blok-size": "2M"}), "s.toml: devices[0].blok-size: unknown key"),
        (
            lambda d: d["devices"][0].update({"size": "3M"}),
            "s.toml: devices[0].size: must be a multiple of block-size",
        ),
        (
            lambda d: d["steps"][0].update({"requested-size": "3G"}),
            "s.toml: steps[0].requested-size: must be at most",
        ),
        (
            lambda d: d["steps"][0].update({"requested-size": "1M"}),
            "s.toml: steps[0].requested-size: must be a multiple",
        ),
        (
            lambda d: d["steps"][2].update({"device": "nope"}),
            's.toml: steps[2].device: unknown device "nope"',
        ),
        (
            lambda d: d["consumers"][0].update({"backend": "dpdk"}),
            "s.toml: consumers[0].backend: must be one of",
        ),
        (lambda d: d["workload"].update({"touch": 2}), "s.toml: workload.touch: must be a number in [0, 1]"),
        (
            lambda d: d["devices"].append(dict(d["devices"][0])),
            's.toml: devices[1].id: duplicate device id "vmem0"',
        ),
        (lambda d: d["devices"][0].update({"addr": "0x1000"}), "s.toml: devices[0].addr: must be a multiple"),
        (lambda d: d["devices"][0].update({"addr": "256M"}), "s.toml: devices[0].addr: overlaps boot RAM"),
        (lambda d: d.pop("devices"), "s.toml: devices: missing"),
    ],
)
def test_errors_name_the_key(edit: Any, message: str) -> None:
    data = tomllib.loads(VALID)
    edit(data)
    with pytest.raises(ScenarioError) as exc:
        scenario_from_dict(data, source="s.toml")
    text = str(exc.value)
    assert text.startswith(message), text
    assert "\n" not in text


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"^s.toml: invalid TOML"):
        parse_scenario("[[devices]\n", source="s.toml")
    with pytest.raises(ScenarioError, match="cannot read"):
        load_scenario(tmp_path / "missing.toml")


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 65), 1 << 65),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.sampled_from(["3M", "2M", "0", "1G", "64G", "0x1000", "vfio", "kvm", "pause", "vmem0"]),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


@given(st.data())
def test_random_mutations_load_or_fail_with_one_line_naming_a_key(data: st.DataObject) -> None:
    base = tomllib.loads(VALID)
    doc = copy.deepcopy(base)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = data.draw(st.sampled_from(paths))
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        op = data.draw(st.sampled_from(["set", "delete", "add"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == "add" and isinstance(parent, dict):
            parent[data.draw(st.sampled_from(["x", "size", "id", "type", "action", "seconds"]))] = data.draw(
                _VALUES
            )
        else:
            parent[path[-1]] = data.draw(_VALUES)
    try:
        sc = scenario_from_dict(doc, source="m.toml")
    except ScenarioError as exc:
        text = str(exc)
        assert "\n" not in text
        assert re.match(r'^m\.toml: [\w.\[\]\\"-]+: \S', text), text
    else:
        assert sc.devices
