"""Machine: built from scenarios, figures consistent after every step, nothing left at close."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.consumers.dma import iouring_available
from ramdiscard.consumers.vfio import DmaLimitError
from ramdiscard.guest import DriverState
from ramdiscard.hostmem import proc_status
from ramdiscard.machine import Machine, parse_scenario
from ramdiscard.units import MiB

IOURING = iouring_available()[0]


def _scenario(backend: str = "null", coordinate: bool = True, extra: str = "", touch: float = 0.5) -> str:
    return f"""
boot-ram = "64M"
[[devices]]
id = "vmem0"
size = "512M"
{extra}
[[consumers]]
type = "vfio"
backend = "{backend}"
coordinate-discards = {"true" if coordinate else "false"}
[[consumers]]
type = "kvm"
mode = "model"
[workload]
touch = {touch}
"""


@given(st.lists(st.integers(0, 8).map(lambda n: n * 64 * MiB), min_size=1, max_size=6))
@settings(max_examples=15)
def test_pins_and_mappings_follow_plugged_memory(sizes: list[int]) -> None:
    with Machine.from_scenario(parse_scenario(_scenario())) as m:
        for size in sizes:
            m.set_requested_size("vmem0", size)
            m.run_guest()
            st_ = m.status()
            assert st_["plugged"] == size == m.drivers["vmem0"].plugged_size
            assert st_["pinned"] == size + 64 * MiB  # boot RAM is pinned whole
            assert st_["dma_mappings"] == size // (2 * MiB) + 1
            assert st_["guest_touched"] == size // 2
            assert m.converged()


@pytest.mark.skipif(not IOURING, reason="io_uring sparse buffers unavailable here")
def test_real_pins_vmpin_and_release_at_close() -> None:
    base = proc_status().vm_pin
    m = Machine.from_scenario(parse_scenario(_scenario("io_uring")))
    try:
        for size in (256 * MiB, 64 * MiB, 0, 128 * MiB):
            m.set_requested_size("vmem0", size)
            m.run_guest()
            st_ = m.status()
            assert st_["vm_pin"] - base == size + 64 * MiB
            assert st_["stale_pinned"] == 0
            assert st_["held"] >= size + 64 * MiB
        assert m.workload is not None and m.workload.verify() == []
    finally:
        m.close()
    assert proc_status().vm_pin == base


@pytest.mark.skipif(not IOURING, reason="io_uring sparse buffers unavailable here")
def test_uncoordinated_pins_whole_region_and_unplug_leaves_stale_pins() -> None:
    base = proc_status().vm_pin
    with Machine.from_scenario(parse_scenario(_scenario("io_uring", coordinate=False, touch=0))) as m:
        assert proc_status().vm_pin - base == 512 * MiB + 64 * MiB
        m.set_requested_size("vmem0", 256 * MiB)
        m.run_guest()
        m.set_requested_size("vmem0", 0)
        m.run_guest()
        st_ = m.status()
        assert st_["vm_pin"] - base == 576 * MiB
        assert st_["stale_pinned"] >= 256 * MiB  # discarded under a live pin: not freed
        assert st_["held"] == 576 * MiB
    assert proc_status().vm_pin == base


def test_file_backing_files_removed_at_close(tmp_path: Path) -> None:
    sc = parse_scenario(_scenario(extra='backing = "file"'))
    m = Machine.from_scenario(sc, workdir=tmp_path)
    assert (tmp_path / "vmem0.mem").exists()
    m.set_requested_size("vmem0", 128 * MiB)
    m.run_guest()
    m.close()
    m.close()
    assert list(tmp_path.iterdir()) == []


def test_dma_limit_check_and_runtime_refusal() -> None:
    # KVM in use: QEMU reserves 32764 mappings for memslots; 100 are left for 512M of 2M blocks
    tight = _scenario().replace('backend = "null"', 'backend = "null"\ndma-limit = 32864')
    with pytest.raises(DmaLimitError, match="use a virtio-mem block-size of at least 8 MiB"):
        Machine.from_scenario(parse_scenario(tight))
    relaxed = _scenario().replace(
        'backend = "null"', 'backend = "null"\ndma-limit = 100\ndma-limit-check = false'
    )
    with Machine.from_scenario(parse_scenario(relaxed)) as m:
        m.set_requested_size("vmem0", 256 * MiB)
        m.run_guest()
        # boot RAM takes one mapping; the guest plugs 64 blocks (128M) at a time and is refused
        # when a whole memory block no longer fits: BUSY, then its retry timer.
        assert m.status()["dma_mappings"] <= 100
        assert m.devices["vmem0"].plugged_size == 128 * MiB
        assert m.drivers["vmem0"].state is DriverState.WAITING


def test_background_thread_follows_requested_size() -> None:
    with Machine.from_scenario(parse_scenario(_scenario())) as m:
        m.start()
        m.set_requested_size("vmem0", 192 * MiB)
        assert m.wait_converged(10)
        assert m.sizes("vmem0")["size"] == 192 * MiB
        m.set_requested_size("vmem0", 0)
        assert m.wait_converged(10)
        assert m.sizes("vmem0")["size"] == 0
        m.stop()


def test_system_reset_and_unplug_all_steps() -> None:
    sc = parse_scenario(
        _scenario()
        + """
[[steps]]
requested-size = "128M"
[[steps]]
action = "system-reset"
[[steps]]
action = "unplug-all"
"""
    )
    with Machine.from_scenario(sc) as m:
        results = [m.run_step(s, i) for i, s in enumerate(sc.steps)]
        assert [r.status["plugged"] for r in results] == [128 * MiB] * 3
        assert (
            results[1].requests == 1
        )  # the rebooted guest plugs 128M again (no UNPLUG_ALL: nothing plugged)
        assert results[2].responses == {"ack": 2}  # UNPLUG_ALL, then one plug


def test_unknown_device_and_bad_size() -> None:
    with Machine.from_scenario(parse_scenario(_scenario())) as m:
        with pytest.raises(KeyError, match="no virtio-mem device 'x'"):
            m.set_requested_size("x", 0)
        with pytest.raises(ValueError):
            m.set_requested_size("vmem0", 3 * MiB)
        assert m.get_requested_size("vmem0") == 0


def test_no_fd_leak() -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with Machine.from_scenario(parse_scenario(_scenario(extra='backing = "memfd"'))) as m:
            m.set_requested_size("vmem0", 64 * MiB)
            m.run_guest()
    assert len(os.listdir("/proc/self/fd")) == before
