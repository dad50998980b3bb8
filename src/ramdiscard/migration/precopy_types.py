"""The precopy's parameters, figures and guest control (rules in
:mod:`ramdiscard.migration.precopy`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_DOWNTIME = 0.3
DEFAULT_MAX_ROUNDS = 30


class GuestControl(Protocol):
    """Stops and restarts the guest's vCPUs (the writer)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...


@dataclass
class PrecopyParams:
    downtime_limit: float = DEFAULT_DOWNTIME
    """Seconds the guest may be stopped at the switchover (QEMU's downtime-limit)."""
    max_bandwidth: int = 0
    """Bytes per second on the wire during the live rounds (0: unlimited)."""
    max_rounds: int = DEFAULT_MAX_ROUNDS
    allow_resize: bool = False
    """Devices stay resizable during the live rounds (frozen only at the switchover);
    needs the ``guard`` under which plug and unplug happen (module rules)."""


@dataclass
class PrecopyStats:
    """Figures of one precopy (QEMU's query-migrate names where they exist)."""

    status: str = "setup"
    rounds: int = 0
    round_bytes: list[int] = field(default_factory=list)
    page_bytes: int = 0
    stream_bytes: int = 0
    total_bytes: int = 0
    """Populated bytes at setup (what round 1 sends)."""
    remaining: int = 0
    dirty_rate: float = 0.0
    """Bytes per second written by the guest, from the last round."""
    bandwidth: float = 0.0
    expected_downtime: float = 0.0
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float = 0.0
    fallback: str | None = None
    pages_sent: int = 0
