"""The guest writer: writes plugged memory only, at its rate, in its pattern, paused on request."""

from __future__ import annotations

import time

import pytest

from ramdiscard.guest.writer import PAGE, GuestWriter
from ramdiscard.machine import Machine, ScenarioError, parse_scenario
from ramdiscard.units import MiB


def _scenario(rate: str = "50M", pattern: str = "random", requested: str = "64M", hot: str = "8M") -> str:
    return f"""
name = "writer"
boot-ram = 0
[[devices]]
id = "vmem0"
size = "128M"
requested-size = "{requested}"
backing = "memfd"
[workload]
write-rate = "{rate}"
write-pattern = "{pattern}"
hot-set = "{hot}"
"""


def _wait(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _resident_outside(m: Machine) -> int:
    dev = m.devices["vmem0"]
    ram = m.blocks[0]
    return sum(ram.resident_bytes(s, e - s) for s, e in dev.discarded_runs())


def test_writes_only_plugged_memory_while_unplugging() -> None:
    with Machine.from_scenario(parse_scenario(_scenario())) as m:
        m.start()
        assert m.wait_converged(20)
        w = m.writer
        assert isinstance(w, GuestWriter)
        _wait(lambda: w.pages_written > 2000)
        m.set_requested_size("vmem0", 16 * MiB)
        assert m.wait_converged(20)
        before = w.pages_written
        _wait(lambda: w.pages_written > before + 2000)
        with m.lock:
            assert m.devices["vmem0"].plugged_size == 16 * MiB
            assert _resident_outside(m) == 0
        m.set_requested_size("vmem0", 48 * MiB)
        assert m.wait_converged(20)
        m.set_requested_size("vmem0", 8 * MiB)
        assert m.wait_converged(20)
        before = w.pages_written
        _wait(lambda: w.pages_written > before + 1000)
        with m.lock:
            assert _resident_outside(m) == 0


@pytest.mark.parametrize("pattern", ["hot", "sequential"])
def test_patterns_stay_in_their_set(pattern: str) -> None:
    with Machine.from_scenario(parse_scenario(_scenario(rate="20M", pattern=pattern))) as m:
        m.start()
        assert m.wait_converged(20)
        w = m.writer
        assert w is not None
        _wait(lambda: w.pages_written > 1000)
        w.pause()
        ram = m.blocks[0]
        (start, length), = list(m.devices["vmem0"].plugged_ranges())
        if pattern == "hot":
            assert ram.resident_bytes(start, 8 * MiB) > 0
            assert ram.resident_bytes(start + 8 * MiB, length - 8 * MiB) == 0
        else:
            written = w.pages_written * PAGE
            assert written < length
            assert ram.resident_bytes(start, written) == written
            assert ram.resident_bytes(start + written, length - written) == 0
        w.resume()


def test_pause_stops_writes_until_resume() -> None:
    with Machine.from_scenario(parse_scenario(_scenario(rate="20M"))) as m:
        m.start()
        w = m.writer
        assert w is not None
        _wait(lambda: w.pages_written > 100)
        w.pause()
        w.pause()
        frozen = w.pages_written
        time.sleep(0.1)
        assert w.pages_written == frozen
        w.resume()
        time.sleep(0.05)
        assert w.pages_written == frozen
        w.resume()
        _wait(lambda: w.pages_written > frozen)


@pytest.mark.parametrize(
    ("key", "value"), [("write-rate", '"fast"'), ("write-pattern", '"zigzag"'), ("hot-set", '"5000"')]
)
def test_bad_workload_keys(key: str, value: str) -> None:
    lines = [ln for ln in _scenario().splitlines() if not ln.startswith(key)]
    text = "\n".join([*lines, f"{key} = {value}", ""])
    with pytest.raises(ScenarioError, match=key):
        parse_scenario(text)
