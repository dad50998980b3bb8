"""QEMU's event rate limiting, on a fake clock (no sleeping)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.qmp.events import EventThrottle, QmpEvent, shutdown_event, size_change_event


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ev(dev: str, size: int, stamp: float = 0.0) -> QmpEvent:
    return size_change_event(dev, size, f"/machine/peripheral/{dev}", timestamp=stamp)


def test_event_json_is_qemu_shaped() -> None:
    e = size_change_event("vm0", 4 << 20, "/machine/peripheral/vm0", timestamp=1700000000.25)
    assert e.to_json() == {
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
        "event": "MEMORY_DEVICE_SIZE_CHANGE",
        "data": {"id": "vm0", "size": 4 << 20, "qom-path": "/machine/peripheral/vm0"},
    }
    assert shutdown_event(timestamp=1.0).to_json()["data"] == {"guest": False, "reason": "host-qmp-quit"}


def test_first_is_immediate_burst_delivers_only_the_last_after_the_window() -> None:
    clock = Clock()
    t = EventThrottle(clock)
    assert t.submit(ev("vm0", 1, stamp=1.0)) == [ev("vm0", 1, stamp=1.0)]
    assert t.next_deadline() == 101.0
    clock.now = 100.3
    assert t.submit(ev("vm0", 2)) == []
    clock.now = 100.6
    assert t.submit(ev("vm0", 3, stamp=7.0)) == []
    assert t.pending == 1
    clock.now = 100.99
    assert t.expire() == []
    clock.now = 101.0
    # The delayed event keeps the timestamp it was raised with.
    assert t.expire() == [ev("vm0", 3, stamp=7.0)]
    assert t.next_deadline() == 102.0  # a new window opened
    clock.now = 102.0
    assert t.expire() == []
    assert t.next_deadline() is None  # nothing stored: the window closed
    clock.now = 102.1
    assert t.submit(ev("vm0", 4)) == [ev("vm0", 4)]


def test_devices_are_limited_independently_and_other_events_pass() -> None:
    clock = Clock()
    t = EventThrottle(clock)
    assert t.submit(ev("vm0", 1)) == [ev("vm0", 1)]
    assert t.submit(ev("vm1", 1)) == [ev("vm1", 1)]
    assert t.submit(ev("vm0", 2)) == []
    down = shutdown_event(timestamp=5.0)
    assert t.submit(down) == [down]
    clock.now += 1.0
    # Expired windows are flushed before a new event is judged.
    assert t.submit(ev("vm1", 2)) == [ev("vm0", 2), ev("vm1", 2)]
    assert t.submit(ev("vm1", 3)) == []
    clock.now += 1.0
    assert t.expire() == [ev("vm1", 3)]


@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=1.5), st.sampled_from(["vm0", "vm1", "vm2"])),
        max_size=60,
    )
)
def test_model_at_most_one_per_second_and_the_last_always_arrives(steps: list[tuple[float, str]]) -> None:
    clock = Clock()
    t = EventThrottle(clock)
    delivered: list[tuple[float, QmpEvent]] = []
    submitted: dict[str, list[int]] = {}
    for i, (dt, dev) in enumerate(steps):
        clock.now += dt
        delivered += [(clock.now, e) for e in t.expire()]
        submitted.setdefault(dev, []).append(i)
        delivered += [(clock.now, e) for e in t.submit(ev(dev, i))]
        deadline = t.next_deadline()
        assert deadline is None or deadline > clock.now
    while (deadline := t.next_deadline()) is not None:
        clock.now = deadline
        delivered += [(clock.now, e) for e in t.expire()]
    for dev, sizes in submitted.items():
        mine = [(at, e.data["size"]) for at, e in delivered if e.data["id"] == dev]
        # Deliveries per device are at least a second apart, in submission order,
        assert all(b[0] - a[0] >= 1.0 - 1e-9 for a, b in itertools.pairwise(mine))
        assert [s for _at, s in mine] == sorted(s for _at, s in mine)
        assert {s for _at, s in mine} <= set(sizes)
        # the first one is never delayed, and the last one is never lost.
        assert mine[0][1] == sizes[0]
        assert mine[-1][1] == sizes[-1]
