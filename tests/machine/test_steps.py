"""Scenario steps snapshot / restore / migrate / dump, and the blockdma consumer type:
consumers follow the restored memory, the guest continues, integrity is checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from ramdiscard.consumers.dma import iouring_available
from ramdiscard.hostmem import proc_status
from ramdiscard.machine import Machine, ScenarioError, parse_scenario
from ramdiscard.migration import MigrationError
from ramdiscard.units import MiB

IOURING = iouring_available()[0]
BOOT = 32 * MiB


def _scenario(steps: str, consumers: str = "", touch: float = 0.5) -> str:
    return f"""
boot-ram = "32M"
[[devices]]
id = "vmem0"
size = "512M"
[[consumers]]
type = "vfio"
backend = "null"
[[consumers]]
type = "kvm"
mode = "model"
{consumers}
[workload]
touch = {touch}
{steps}
"""


def _check(m: Machine, plugged: int) -> None:
    st = m.status()
    assert st["plugged"] == plugged == m.drivers["vmem0"].plugged_size
    assert st["dma_mappings"] == plugged // (2 * MiB) + 1
    assert m.converged()
    assert m.workload is not None and m.workload.verify() == []


def test_snapshot_then_restore_rolls_memory_guest_and_pins_back() -> None:
    sc = parse_scenario(
        _scenario(
            """
[[steps]]
requested-size = "256M"
[[steps]]
action = "snapshot"
[[steps]]
requested-size = "64M"
[[steps]]
action = "restore"
[[steps]]
requested-size = "384M"
"""
        )
    )
    with Machine.from_scenario(sc) as m:
        results = [m.run_step(s, i) for i, s in enumerate(sc.steps)]
        assert [r.status["plugged"] for r in results] == [
            256 * MiB,
            256 * MiB,
            64 * MiB,
            256 * MiB,
            384 * MiB,
        ]
        snap, restore = results[1].details, results[3].details
        assert snap["page_bytes"] == BOOT + 256 * MiB
        assert snap["file_allocated"] < BOOT + 300 * MiB  # sparse: nothing of the unplugged 256M
        assert restore["page_bytes"] == snap["page_bytes"]
        assert results[3].requests == 0  # the restored guest is where it was at the snapshot
        assert results[3].status["requested"] == 256 * MiB
        _check(m, 384 * MiB)
        assert all(r.machine is None for r in results)
        snap_path = Path(snap["path"])
        assert snap_path.exists()
    assert not snap_path.exists()  # default snapshot files go with the machine


def test_restore_of_a_damaged_snapshot_fails_and_leaves_nothing_plugged(tmp_path: Path) -> None:
    sc = parse_scenario(
        _scenario(
            '[[steps]]\nrequested-size = "128M"\n'
            f'[[steps]]\naction = "snapshot"\npath = "{tmp_path}/s.snap"\n'
        )
    )
    with Machine.from_scenario(sc) as m:
        for i, s in enumerate(sc.steps):
            m.run_step(s, i)
        data = bytearray((tmp_path / "s.snap").read_bytes())
        data[len(bytes(data).rstrip(b"\0")) - 1] ^= 0xFF  # the last byte the guest wrote
        (tmp_path / "s.snap").write_bytes(bytes(data))
        with pytest.raises(MigrationError):
            m.restore(str(tmp_path / "s.snap"))
        assert m.status()["plugged"] == 0 and m.status()["dma_mappings"] == 1


@pytest.mark.parametrize("transport", ["file", "tcp"])
def test_migrate_continues_on_a_fresh_machine(transport: str) -> None:
    sc = parse_scenario(
        _scenario(
            f"""
[[steps]]
requested-size = "192M"
[[steps]]
action = "migrate"
transport = "{transport}"
[[steps]]
requested-size = "96M"
"""
        )
    )
    m = Machine.from_scenario(sc)
    try:
        m.run_step(sc.steps[0], 0)
        res = m.run_step(sc.steps[1], 1)
        assert res.machine is not None and res.machine is not m
        with pytest.raises(ValueError, match="closed"):
            m.set_requested_size("vmem0", 0)
        m = res.machine
        assert res.details["transport"] == transport
        assert res.details["page_bytes"] == BOOT + 192 * MiB
        _check(m, 192 * MiB)
        last = m.run_step(sc.steps[2], 2)
        assert last.machine is None
        _check(m, 96 * MiB)
    finally:
        m.close()


def test_dump_holds_boot_ram_and_plugged_memory_only(tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile

    out = tmp_path / "core.elf"
    sc = parse_scenario(
        _scenario(f'[[steps]]\nrequested-size = "64M"\n[[steps]]\naction = "dump"\npath = "{out}"\n')
    )
    with Machine.from_scenario(sc) as m:
        res = [m.run_step(s, i) for i, s in enumerate(sc.steps)][-1]
        assert res.details["bytes"] == BOOT + 64 * MiB
        with open(out, "rb") as f:
            elf = ELFFile(f)
            loads = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_LOAD"]
            assert sum(seg["p_filesz"] for seg in loads) == BOOT + 64 * MiB
            assert {seg["p_paddr"] for seg in loads} >= {0, m.devices["vmem0"].addr}
    assert out.exists()  # a path given by the scenario is kept


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        (
            '[[steps]]\naction = "restore"',
            'steps[0].action: "restore" needs a path or an earlier "snapshot" step',
        ),
        ('[[steps]]\nrequested-size = "2M"\npath = "x"', 'steps[0].path: not valid for action "resize"'),
        (
            '[[steps]]\naction = "snapshot"\ntransport = "tcp"',
            'steps[0].transport: not valid for action "snapshot"',
        ),
        ('[[steps]]\naction = "migrate"\ntransport = "udp"', "steps[0].transport: must be one of file, tcp"),
        (
            '[[steps]]\naction = "migrate"\ntransport = "tcp"\npath = "x"',
            "steps[0].path: not valid with transport",
        ),
        ('[[steps]]\naction = "dump"\npath = ""', "steps[0].path: must not be empty"),
        ('[[steps]]\naction = "dump"\ndevice = "vmem0"', 'steps[0].device: not valid for action "dump"'),
    ],
)
def test_step_validation_names_the_key(steps: str, message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(_scenario(steps), source="s.toml")
    assert str(info.value).startswith(f"s.toml: {message}")


def test_migrate_refuses_a_fixed_file_path() -> None:
    text = _scenario('[[steps]]\naction = "migrate"').replace(
        'size = "512M"', 'size = "512M"\nbacking = "file"\npath = "/dev/shm/x.mem"'
    )
    with pytest.raises(ScenarioError, match=r"steps\[0\].action: \"migrate\" needs a fresh destination"):
        parse_scenario(text)


BLOCKDMA = """
[[consumers]]
type = "blockdma"
id = "nvme0"
backend = "{backend}"
coordinate-discards = {coord}
iova-base = "0x100000000"
iova-align = "2M"
"""


def test_blockdma_consumer_pins_follow_plugged_memory() -> None:
    sc = parse_scenario(_scenario("", BLOCKDMA.format(backend="null", coord="true")))
    with Machine.from_scenario(sc) as m:
        for size in (128 * MiB, 32 * MiB, 0):
            m.set_requested_size("vmem0", size)
            m.run_guest()
            nvme = next(c for c in m.status()["consumers"] if c["id"] == "nvme0")
            assert nvme["type"] == "blockdma" and nvme["pinned_bytes"] == BOOT + size
            assert nvme["modes"] == {"pc.ram": "whole", "vmem0-mem": "listener"}


def test_uncoordinated_consumers_get_their_own_policy_and_say_so() -> None:
    sc = parse_scenario(
        _scenario("", BLOCKDMA.format(backend="null", coord="false")).replace(
            'backend = "null"\n[[consumers]]\ntype = "kvm"',
            'backend = "null"\ncoordinate-discards = false\n[[consumers]]\ntype = "kvm"',
        )
    )
    with Machine.from_scenario(sc) as m:
        assert m.uncoordinated_policy.snapshot().disable == 2
        assert m.policy.snapshot().disable == 0
        assert sum("holds a discard policy of its own" in n for n in m.notes) == 2
        m.set_requested_size("vmem0", 64 * MiB)
        m.run_guest()
        st = m.status()
        assert st["plugged"] == 64 * MiB
        assert st["pinned"] == 2 * (BOOT + 512 * MiB)  # both pin everything, whatever is plugged
        assert st["dma_mappings"] == 2  # boot RAM and the whole region
    assert m.uncoordinated_policy.snapshot().disable == 0


@pytest.mark.skipif(not IOURING, reason="io_uring sparse buffers unavailable here")
def test_blockdma_and_vfio_real_pins_after_restore() -> None:
    base = proc_status().vm_pin
    sc = parse_scenario(
        _scenario(
            '[[steps]]\nrequested-size = "128M"\n[[steps]]\naction = "snapshot"\n'
            '[[steps]]\nrequested-size = "0"\n[[steps]]\naction = "restore"\n',
            BLOCKDMA.format(backend="io_uring", coord="true"),
        ).replace('type = "vfio"\nbackend = "null"', 'type = "vfio"\nbackend = "io_uring"')
    )
    with Machine.from_scenario(sc) as m:
        for i, s in enumerate(sc.steps):
            res = m.run_step(s, i)
            plugged = res.status["plugged"]
            assert proc_status().vm_pin - base == 2 * (BOOT + plugged)  # two consumers pin each byte
        assert plugged == 128 * MiB
    assert proc_status().vm_pin == base


@pytest.mark.timeout(60)
def test_a_step_returns_with_a_note_when_the_guest_thread_has_died(monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread mode: the guest thread stops on a driver error; the step waits no longer for
    drivers that will never converge and says why."""
    from ramdiscard.guest import GuestDriver

    sc = parse_scenario(_scenario('[[steps]]\nrequested-size = "64M"'))
    m = Machine.from_scenario(sc)
    try:

        def broken(self: GuestDriver) -> None:
            raise RuntimeError("driver bug")

        monkeypatch.setattr(GuestDriver, "step", broken)
        m.start()
        res = m.run_step(sc.steps[0])
        assert "the guest thread stopped before the drivers converged (see the log)" in res.notes
        assert m.wait_converged(timeout=None) is False
    finally:
        m.close()
