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
from ramdiscard.machine.scenario import GuestScenario, load_any_scenario
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
    sc = load_any_scenario(path)
    if isinstance(sc, GuestScenario):
        assert sc.steps and sc.guest.requested_size
    else:
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


# -- device properties: one source of truth --------------------------------------------

DEVICE_SIZE = 1 * GiB


def _device_accepts(**props: Any) -> tuple[bool, int]:
    """Realize a virtio-mem device on anonymous memory with ``props``: (accepted, block size)."""
    from ramdiscard.errors import InvalidArgument
    from ramdiscard.hostmem import RamBlock
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.memory.system import MemorySystem
    from ramdiscard.providers.virtio_mem import VirtioMem

    block = RamBlock(DEVICE_SIZE, "anonymous", name="t-mem")
    try:
        mr = MemoryRegion.new_ram("t-mem", block, system=MemorySystem("t"))
        try:
            dev = VirtioMem(mr, addr=props.pop("addr", 4 * GiB), id="t", **props)
        except InvalidArgument:
            return False, 0
        bs = dev.block_size
        dev.unrealize()
        return True, bs
    finally:
        block.close()


def _one_device(**keys: Any) -> dict[str, Any]:
    return {"boot-ram": "512M", "devices": [{"id": "vmem0", "size": DEVICE_SIZE, **keys}]}


@pytest.mark.parametrize("thp", [None, 8 * MiB], ids=["this-host", "host-with-8M-thp"])
def test_default_block_size_is_the_devices(thp: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    if thp is not None:  # a host whose THP size differs from 2M
        monkeypatch.setattr("ramdiscard.providers.virtio_mem.config.thp_size", lambda: thp)
    sc = scenario_from_dict(_one_device(), source="s.toml")
    accepted, device_default = _device_accepts()
    assert accepted
    assert sc.devices[0].block_size == device_default


@pytest.mark.parametrize(
    "block_size", [0, 4096, 512 * 1024, MiB, 2 * MiB, 3 * MiB, 4 * MiB, 6 * MiB, 64 * MiB, DEVICE_SIZE]
)
def test_block_size_gets_the_devices_answer(block_size: int) -> None:
    accepted, _ = _device_accepts(block_size=block_size)
    try:
        sc = scenario_from_dict(_one_device(**{"block-size": block_size}), source="s.toml")
    except ScenarioError as exc:
        assert not accepted, f"the device accepts {block_size:#x}, the scenario refuses it: {exc}"
        assert str(exc).startswith("s.toml: devices[0].block-size: "), str(exc)
        assert "\n" not in str(exc)
    else:
        assert accepted, f"the device refuses {block_size:#x}, the scenario accepts it"
        assert sc.devices[0].block_size == block_size


@pytest.mark.parametrize(
    ("key", "value", "props"),
    [
        ("requested-size", 3 * MiB, {"block_size": 2 * MiB, "requested_size": 3 * MiB}),
        ("requested-size", 2 * GiB, {"block_size": 2 * MiB, "requested_size": 2 * GiB}),
        ("addr", 4 * GiB + MiB, {"block_size": 2 * MiB, "addr": 4 * GiB + MiB}),
        ("requested-size", 4 * MiB, {"block_size": 2 * MiB, "requested_size": 4 * MiB}),
        ("addr", 4 * GiB + 2 * MiB, {"block_size": 2 * MiB, "addr": 4 * GiB + 2 * MiB}),
    ],
)
def test_device_properties_get_the_devices_answer(key: str, value: int, props: dict[str, Any]) -> None:
    accepted, _ = _device_accepts(**props)
    try:
        scenario_from_dict(_one_device(**{"block-size": "2M", key: value}), source="s.toml")
    except ScenarioError as exc:
        assert not accepted, f"the device accepts {key} {value:#x}, the scenario refuses it: {exc}"
        assert str(exc).startswith(f"s.toml: devices[0].{key}: "), str(exc)
    else:
        assert accepted, f"the device refuses {key} {value:#x}, the scenario accepts it"
