"""Real-guest scenario files (a ``[guest]`` table): valid files load with the device's
own defaults; every bad key or value is one line naming it, and nothing is started
(``ramdiscard run`` refuses before QEMU is looked for)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ramdiscard.cli.main import main
from ramdiscard.machine.scenario import (
    GuestAction,
    GuestScenario,
    ScenarioError,
    load_scenario,
    parse_any_scenario,
)
from ramdiscard.realguest import qemu
from ramdiscard.units import GiB, MiB

VALID = """
name = "g"
[guest]
ram = "1G"
region-size = "1G"
requested-size = "256M"
[[steps]]
action = "run"
command = "touch 100"
[[steps]]
requested-size = "512M"
[[steps]]
action = "system-reset"
timeout = 60
[[steps]]
action = "wait"
label = "settle"
"""


def parse(text: str) -> GuestScenario:
    sc = parse_any_scenario(text, source="g.toml")
    assert isinstance(sc, GuestScenario)
    return sc


def test_valid_guest_scenario() -> None:
    sc = parse(VALID)
    g = sc.guest
    assert (g.ram, g.region_size, g.block_size, g.requested_size) == (1 * GiB, 1 * GiB, 2 * MiB, 256 * MiB)
    assert g.kernel is None and g.initramfs is None and g.consumers == ("vfio",)
    assert [s.action for s in sc.steps] == [
        GuestAction.RUN, GuestAction.RESIZE, GuestAction.SYSTEM_RESET, GuestAction.WAIT,
    ]  # fmt: skip
    assert sc.steps[1].requested_size == 512 * MiB and sc.steps[2].timeout == 60.0
    assert [s.describe() for s in sc.steps] == ["run touch 100", "-> 512 MiB", "system-reset", "settle"]


def test_defaults_and_own_files(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"k")
    sc = parse(f'[guest]\nkernel = "{kernel}"\nconsumers = []\n')
    assert sc.guest.kernel == kernel and sc.guest.initramfs is None and sc.guest.consumers == ()
    assert (sc.guest.ram, sc.guest.region_size, sc.guest.requested_size) == (2 * GiB, 2 * GiB, 0)
    assert sc.steps == ()


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[guest]\nram = "3G"', "guest.ram", "multiple of 128M from 256M to 2G"),
        ('[guest]\nram = "300M"', "guest.ram", "multiple of 128M"),
        ('[guest]\nregion-size = "3M"', "guest.region-size", "multiple of block-size"),
        ('[guest]\nblock-size = "3M"', "guest.block-size", "power of two"),
        ('[guest]\nrequested-size = "4G"', "guest.requested-size", "at most the device size"),
        ('[guest]\nrequested-size = "1M"', "guest.requested-size", "multiple of block-size"),
        ('[guest]\nconsumers = ["kvm"]', "guest.consumers[0]", "must be one of vfio"),
        ('[guest]\nconsumers = ["vfio", "vfio"]', "guest.consumers[1]", "duplicate"),
        ('[guest]\nconsumers = "vfio"', "guest.consumers", "array"),
        ('[guest]\nkernel = "/nonexistent/vmlinuz"', "guest.kernel", "existing file"),
        (f'[guest]\ninitramfs = "{"x" * 5000}"', "guest.initramfs", "existing file"),  # ENAMETOOLONG
        ('[guest]\ninitramfs = "a\\u0000b"', "guest.initramfs", "existing file"),
        ("[guest]\nboot-timeout = 0", "guest.boot-timeout", "seconds"),
        ('[guest]\nmemory = "2G"', "guest.memory", "unknown key"),
        ("guest = 3", "guest", "must be a table"),
        ('[guest]\n[[devices]]\nid = "x"\nsize = "1G"', "devices", "unknown key"),
        ('[guest]\n[[steps]]\nlabel = "x"', "steps[0].action", "missing"),
        ('[guest]\n[[steps]]\naction = "resize"', "steps[0].requested-size", "missing"),
        ('[guest]\n[[steps]]\naction = "run"', "steps[0].command", "missing"),
        ('[guest]\n[[steps]]\naction = "run"\ncommand = "rm -rf /"', "steps[0].command", "touch N"),
        ('[guest]\n[[steps]]\naction = "run"\ncommand = "touch 0"', "steps[0].command", "touch N"),
        ('[guest]\n[[steps]]\naction = "wait"\ncommand = "free"', "steps[0].command", "not valid for"),
        ('[guest]\n[[steps]]\naction = "migrate"', "steps[0].action", "must be one of"),
        ('[guest]\n[[steps]]\nrequested-size = "5G"', "steps[0].requested-size", "at most the device"),
        ('[guest]\n[[steps]]\naction = "wait"\ntimeout = -1', "steps[0].timeout", "seconds"),
        ('[guest]\n[[steps]]\naction = "wait"\nseconds = 1', "steps[0].seconds", "unknown key"),
        ("[guest]\nsteps = 1", "guest.steps", "unknown key"),
    ],
)
def test_bad_values_are_one_line_naming_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_any_scenario(text, source="g.toml")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"g.toml: {key}: "), message
    assert words in message, message


def test_the_model_loader_refuses_a_guest_file(tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text(VALID)
    with pytest.raises(ScenarioError, match=r"^g\.toml: guest: a real-guest scenario"):
        load_scenario(path)


def test_run_refuses_a_bad_file_before_anything_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # If validation did not come first, the missing QEMU would be the error instead.
    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    monkeypatch.setattr(qemu, "QEMU_CACHE_BINARY", tmp_path / "absent")
    path = tmp_path / "g.toml"
    path.write_text('[guest]\nram = "3G"\n')
    assert main(["run", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "g.toml: guest.ram:" in err and "build-qemu" not in err


def test_run_check_and_missing_qemu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "g.toml"
    path.write_text(VALID)
    assert main(["run", str(path), "--check"]) == 0
    assert capsys.readouterr().out.strip() == "g.toml: ok: real guest, 4 step(s)"
    monkeypatch.delenv("RAMDISCARD_QEMU", raising=False)
    monkeypatch.setattr(qemu, "QEMU_CACHE_BINARY", tmp_path / "absent")
    assert main(["run", str(path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vhost-user-device-pci" in err and "scripts/build-qemu.sh" in err
