"""Command dispatch and the QOM tree, against real VirtioMem devices (no server)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ramdiscard.qmp import CommandDispatcher, QmpBackend, QmpError, version_info
from ramdiscard.units import MiB
from tests.qmp.conftest import DeviceSetBackend


@pytest.fixture
def idle() -> Iterator[DeviceSetBackend]:
    b = DeviceSetBackend([("vm0", 64 * MiB), ("vm1", 32 * MiB)], guest=False)
    yield b
    b.close()


@pytest.fixture
def qmp(idle: DeviceSetBackend) -> CommandDispatcher:
    assert isinstance(idle, QmpBackend)
    return CommandDispatcher(idle, version_info())


def fails(qmp: CommandDispatcher, name: str, args: dict[str, Any]) -> tuple[str, str]:
    with pytest.raises(QmpError) as info:
        qmp.execute(name, args)
    return info.value.error_class.value, info.value.desc


def test_query_version_and_commands(qmp: CommandDispatcher) -> None:
    v = qmp.execute("query-version", {}).value
    assert set(v["qemu"]) == {"major", "minor", "micro"}
    assert v["package"].startswith("ramdiscard ")
    names = {c["name"] for c in qmp.execute("query-commands", {}).value}
    assert {"qmp_capabilities", "qom-get", "qom-set", "qom-list", "query-memory-devices", "quit"} <= names
    assert {"x-ramdiscard-status", "x-ramdiscard-migrate", "x-ramdiscard-dump"} <= names


def test_query_memory_devices_is_qemu_shaped(qmp: CommandDispatcher, idle: DeviceSetBackend) -> None:
    devs = qmp.execute("query-memory-devices", {}).value
    vm0 = idle.devs["vm0"].vmem
    assert devs[0] == {
        "type": "virtio-mem",
        "data": {
            "id": "vm0",
            "memaddr": vm0.addr,
            "requested-size": 0,
            "size": 0,
            "max-size": 64 * MiB,
            "block-size": 2 * MiB,
            "node": 0,
            "memdev": "/objects/mem-vm0",
        },
    }
    assert devs[1]["data"]["id"] == "vm1"


def test_qom_get_set_by_full_and_partial_paths(qmp: CommandDispatcher, idle: DeviceSetBackend) -> None:
    for path in ("/machine/peripheral/vm0", "vm0", "peripheral/vm0", "//machine//peripheral/vm0/"):
        assert qmp.execute("qom-get", {"path": path, "property": "requested-size"}).value == 0
    assert qmp.execute("qom-set", {"path": "vm0", "property": "requested-size", "value": 8 * MiB}).value == {}
    assert idle.devs["vm0"].vmem.requested_size == 8 * MiB
    get = {p: qmp.execute("qom-get", {"path": "vm0", "property": p}).value for p in ("size", "block-size")}
    assert get == {"size": 0, "block-size": 2 * MiB}
    assert qmp.execute("qom-get", {"path": "vm0", "property": "memaddr"}).value == idle.devs["vm0"].vmem.addr
    assert qmp.execute("qom-get", {"path": "vm0", "property": "memdev"}).value == "/objects/mem-vm0"
    assert qmp.execute("qom-get", {"path": "vm0", "property": "type"}).value == "virtio-mem-pci"
    # Negative values wrap to uint64, as in QEMU's input visitor: -2 MiB is 2^64 - 2 MiB.
    assert fails(qmp, "qom-set", {"path": "vm0", "property": "requested-size", "value": -2 * MiB})[1] == (
        "'requested-size' cannot exceed the memory backend size(0x4000000)"
    )


def test_qom_list(qmp: CommandDispatcher) -> None:
    props = {p["name"]: p["type"] for p in qmp.execute("qom-list", {"path": "vm0"}).value}
    assert props["requested-size"] == "size"
    assert props["memdev"] == "link<memory-backend>"
    children = {p["name"]: p["type"] for p in qmp.execute("qom-list", {"path": "/machine/peripheral"}).value}
    assert children["vm0"] == children["vm1"] == "child<virtio-mem-pci>"
    assert {p["name"] for p in qmp.execute("qom-list", {"path": "/"}).value} >= {"machine", "objects"}


@pytest.mark.parametrize(
    ("value", "desc"),
    [
        (3 * MiB, "'requested-size' has to be multiples of 'block-size' (0x200000)"),
        (1 * MiB, "'requested-size' has to be multiples of 'block-size' (0x200000)"),
        (66 * MiB, "'requested-size' cannot exceed the memory backend size(0x4000000)"),
        ("8M", "Parameter 'requested-size' expects uint64"),
        (8.0 * MiB, "Parameter 'requested-size' expects uint64"),
        (True, "Parameter 'requested-size' expects uint64"),
        (None, "Parameter 'requested-size' expects uint64"),
        (1 << 64, "Parameter 'requested-size' expects uint64"),
    ],
)
def test_refused_requested_size_changes_nothing(
    qmp: CommandDispatcher, idle: DeviceSetBackend, value: Any, desc: str
) -> None:
    args = {"path": "/machine/peripheral/vm0", "property": "requested-size", "value": value}
    assert fails(qmp, "qom-set", args) == ("GenericError", desc)
    assert idle.devs["vm0"].vmem.requested_size == 0
    assert not [c for c in idle.calls if c.startswith("set_requested_size")]


@pytest.mark.parametrize(
    ("name", "args", "expected"),
    [
        ("qom-get", {"path": "nope", "property": "size"}, ("DeviceNotFound", "Device 'nope' not found")),
        (
            "qom-set",
            {"path": "/machine/peripheral/x", "property": "size", "value": 0},
            ("DeviceNotFound", "Device '/machine/peripheral/x' not found"),
        ),
        (
            "qom-get",
            {"path": "vm0", "property": "foo"},
            ("GenericError", "Property 'virtio-mem-pci.foo' not found"),
        ),
        (
            "qom-set",
            {"path": "vm0", "property": "foo", "value": 1},
            ("GenericError", "Property 'virtio-mem-pci.foo' not found"),
        ),
        (
            "qom-set",
            {"path": "vm0", "property": "size", "value": 0},
            ("GenericError", "Property 'virtio-mem.size' is not writable"),
        ),
        (
            "qom-set",
            {"path": "vm0", "property": "block-size", "value": 0},
            ("GenericError", "'block-size' cannot be changed"),
        ),
        (
            "qom-set",
            {"path": "vm0", "property": "memaddr", "value": 0},
            (
                "GenericError",
                "Attempt to set property 'memaddr' on anonymous device (type 'virtio-mem') "
                "after it was realized",
            ),
        ),
        ("qom-get", {"path": "vm0"}, ("GenericError", "Parameter 'property' is missing")),
        (
            "qom-get",
            {"path": 1, "property": "x"},
            ("GenericError", "Invalid parameter type for 'path', expected: string"),
        ),
        (
            "qom-get",
            {"path": "vm0", "property": "size", "x": 1},
            ("GenericError", "Parameter 'x' is unexpected"),
        ),
        ("query-version", {"x": 1}, ("GenericError", "Parameter 'x' is unexpected")),
        ("no-such-command", {}, ("CommandNotFound", "The command no-such-command has not been found")),
        (
            "x-ramdiscard-dump",
            {"path": "/nonexistent/dump"},
            ("GenericError", "[Errno 13] cannot write /nonexistent/dump"),
        ),
        (
            "x-ramdiscard-migrate",
            {"uri": "file:/tmp/x"},
            ("GenericError", "x-ramdiscard-migrate is unavailable: this test backend cannot migrate"),
        ),
    ],
)
def test_errors_use_qemu_classes_and_messages(
    qmp: CommandDispatcher, name: str, args: dict[str, Any], expected: tuple[str, str]
) -> None:
    assert fails(qmp, name, args) == expected


def test_ambiguous_partial_path(idle: DeviceSetBackend) -> None:
    idle.devs["vm1"].memdev = "vm0"  # now "vm0" names a device and a memory backend
    qmp = CommandDispatcher(idle, version_info())
    assert fails(qmp, "qom-list", {"path": "vm0"}) == ("GenericError", "Path 'vm0' is ambiguous")
    assert fails(qmp, "qom-get", {"path": "vm0", "property": "type"})[0] == "DeviceNotFound"
    assert qmp.execute("qom-get", {"path": "/objects/vm0", "property": "type"}).value == "memory-backend-ram"


def test_quit_and_status(qmp: CommandDispatcher) -> None:
    out = qmp.execute("quit", {})
    assert out.quit and out.value == {}
    status = qmp.execute("x-ramdiscard-status", {}).value
    assert status["plugged"] == 0 and [d["id"] for d in status["devices"]] == ["vm0", "vm1"]
