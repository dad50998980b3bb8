"""QMP events and QEMU's per-key event rate limiting (pure; the clock is injected).

Rules (QEMU monitor/monitor.c, monitor_qapi_event_queue):

* An event carries the wall-clock time it was *raised* (``timestamp``), also when its
  delivery is delayed by the rate limiter.
* Rate-limited events (here ``MEMORY_DEVICE_SIZE_CHANGE``, 1 s, keyed by the device's
  ``qom-path`` as QEMU keys it) follow QEMU's algorithm: with no window open for the key
  the event is delivered at once and a window of ``rate`` seconds opens. An event inside
  an open window is stored, replacing any stored one: only the last is delivered. When
  the window ends, a stored event is delivered and a new window opens; with nothing
  stored the window just closes. So a burst yields the first and the last event, and at
  most one event per key per ``rate`` seconds.
* Other events pass through unthrottled.

Theory of operation: :class:`EventThrottle` keeps one open window per key (its end time
and the pending event, if any). The owner calls :meth:`EventThrottle.submit` for each new
event and :meth:`EventThrottle.expire` when :meth:`EventThrottle.next_deadline` has
passed; both return the events to deliver now, in order. Time comes from ``clock``
(monotonic seconds), so tests advance a fake clock instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

MEMORY_DEVICE_SIZE_CHANGE: Final = "MEMORY_DEVICE_SIZE_CHANGE"
SHUTDOWN: Final = "SHUTDOWN"

DEFAULT_RATES: Final[Mapping[str, float]] = {MEMORY_DEVICE_SIZE_CHANGE: 1.0}
"""Seconds between two deliveries per key (QEMU: 1000 ms for this event)."""


@dataclass(frozen=True)
class QmpEvent:
    """One event: ``name``, ``data`` and the wall-clock time it was raised."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    def to_json(self) -> dict[str, Any]:
        seconds = int(self.timestamp)
        micro = round((self.timestamp - seconds) * 1_000_000)
        if micro >= 1_000_000:
            seconds, micro = seconds + 1, micro - 1_000_000
        return {
            "timestamp": {"seconds": seconds, "microseconds": micro},
            "event": self.name,
            "data": self.data,
        }


def size_change_event(
    device_id: str, size: int, qom_path: str, *, timestamp: float | None = None
) -> QmpEvent:
    """MEMORY_DEVICE_SIZE_CHANGE as virtio-mem-pci raises it (``size`` = plugged bytes)."""
    return QmpEvent(
        MEMORY_DEVICE_SIZE_CHANGE,
        {"id": device_id, "size": size, "qom-path": qom_path},
        time.time() if timestamp is None else timestamp,
    )


def shutdown_event(reason: str = "host-qmp-quit", *, timestamp: float | None = None) -> QmpEvent:
    """SHUTDOWN as QEMU raises it after ``quit``."""
    return QmpEvent(
        SHUTDOWN, {"guest": False, "reason": reason}, time.time() if timestamp is None else timestamp
    )


def qmp_event(name: str, data: dict[str, Any] | None = None, *, timestamp: float | None = None) -> QmpEvent:
    """An event raised now (RESET, STOP, RESUME, SHUTDOWN...)."""
    return QmpEvent(name, data or {}, time.time() if timestamp is None else timestamp)


def dump_completed_event(result: dict[str, Any], error: str | None) -> QmpEvent:
    """DUMP_COMPLETED as QEMU raises it when a dump ends (``error`` only on failure)."""
    data: dict[str, Any] = {"result": dict(result)}
    if error is not None:
        data["error"] = error
    return qmp_event("DUMP_COMPLETED", data)


def throttle_key(event: QmpEvent) -> str | None:
    """The per-device key of a rate-limited event (QEMU compares ``qom-path``)."""
    if event.name == MEMORY_DEVICE_SIZE_CHANGE:
        return str(event.data.get("qom-path", event.data.get("id", "")))
    return None


@dataclass
class _Window:
    end: float
    pending: QmpEvent | None = None


class EventThrottle:
    """QEMU's event rate limiter; see the module rules.

    ``clock`` returns monotonic seconds; ``rates`` maps event names to their minimum
    delivery interval in seconds (names absent from it are not limited).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        rates: Mapping[str, float] = DEFAULT_RATES,
    ) -> None:
        for name, rate in rates.items():
            if rate <= 0:
                raise ValueError(f"rate for {name} must be positive, got {rate}")
        self._clock = clock
        self._rates = dict(rates)
        self._windows: dict[tuple[str, str], _Window] = {}

    def submit(self, event: QmpEvent) -> list[QmpEvent]:
        """Offer a new event; returns what to deliver now (the event, or nothing)."""
        due = self.expire()
        rate = self._rates.get(event.name)
        key = throttle_key(event)
        if rate is None or key is None:
            return [*due, event]
        window = self._windows.get((event.name, key))
        if window is None:
            self._windows[(event.name, key)] = _Window(self._clock() + rate)
            return [*due, event]
        window.pending = event
        return due

    def expire(self) -> list[QmpEvent]:
        """Close or roll over every window that has ended; returns the stored events
        that become due, oldest window first."""
        now = self._clock()
        out: list[QmpEvent] = []
        for wkey, window in sorted(self._windows.items(), key=lambda kv: kv[1].end):
            if window.end > now:
                continue
            if window.pending is None:
                del self._windows[wkey]
            else:
                out.append(window.pending)
                window.pending = None
                window.end = now + self._rates[wkey[0]]
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`expire` next has work (clock seconds), or None with no window open."""
        return min((w.end for w in self._windows.values()), default=None)

    @property
    def pending(self) -> int:
        """Events stored for later delivery."""
        return sum(1 for w in self._windows.values() if w.pending is not None)
