"""Running one scenario step on a machine: the host's action, then the guest's reaction.

Rules:

* :func:`run_step` applies the step's action through the machine's public methods (its
  handler in :data:`HANDLERS`), then lets the guest react: synchronously
  (:meth:`Machine.run_guest`) unless the guest thread runs, in which case it waits until
  the drivers converge. It reports the requests, their responses by name, notes on
  drivers that did not reach the requested size, the machine's status and the action's
  figures (:class:`StepResult`).
* An action may replace the machine (``migrate``, ``live-migrate``): the handler returns the machine to
  continue with, the step reports it in :attr:`StepResult.machine`, and the guest's
  reaction and the figures are the new machine's.
* A new step kind is an :class:`~ramdiscard.machine.scenario.Action` member with a
  :data:`Handler` in :data:`HANDLERS` (and its reader in the scenario's steps table).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, Self, TypeVar

from ramdiscard.guest import DriverState, Exchange, GuestDriver
from ramdiscard.machine.files import MachineFiles
from ramdiscard.machine.parts import OnRequest
from ramdiscard.machine.scenario import Action, Scenario, StepSpec, Transport
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.units import format_size


class StepMachine(Protocol):
    """The machine a step runs on: the parts and control methods the handlers use
    (:class:`ramdiscard.machine.Machine` is one; see its methods for the contracts)."""

    @property
    def scenario(self) -> Scenario: ...

    @property
    def files(self) -> MachineFiles: ...

    @property
    def lock(self) -> AbstractContextManager[bool]: ...

    @property
    def devices(self) -> Mapping[str, VirtioMem]: ...

    @property
    def drivers(self) -> Mapping[str, GuestDriver]: ...

    @property
    def running(self) -> bool: ...

    def set_requested_size(self, dev_id: str, size: int) -> None: ...

    def unplug_all(self, dev_id: str | None = None) -> None: ...

    def system_reset(self) -> None: ...

    def snapshot(self, path: str | None = None) -> dict[str, Any]: ...

    def restore(self, path: str | None = None) -> dict[str, Any]: ...

    def migrate(
        self, transport: Transport | str = Transport.FILE, path: str | None = None
    ) -> tuple[Self, dict[str, Any]]: ...

    def live_migrate(
        self,
        requested: tuple[tuple[str, int], ...] = (),
        *,
        downtime_limit_ms: int = 300,
        max_bandwidth: int = 0,
    ) -> tuple[Self, dict[str, Any]]: ...

    def dump(self, path: str, *, durable: bool = True) -> dict[str, Any]: ...

    def run_guest(
        self, max_requests: int = 1_000_000, on_request: OnRequest | None = None
    ) -> list[Exchange]: ...

    def wait_converged(self, timeout: float | None = None) -> bool: ...

    def converged(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


M = TypeVar("M", bound=StepMachine)


@dataclass
class StepResult(Generic[M]):
    """What one step did: its requests, the final status, the wall time.

    ``machine`` is set when the step replaced the machine (``migrate``): the returned
    machine is the one to continue with, and the old one is closed. ``details`` holds the
    figures of snapshot/restore/migrate/dump steps."""

    index: int
    label: str
    seconds: float
    requests: int
    responses: dict[str, int]
    converged: bool
    status: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    machine: M | None = None


@dataclass
class Outcome(Generic[M]):
    """What a handler did: the machine to continue with, figures and notes."""

    machine: M
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


class Handler(Protocol):
    """``fn(machine, step, index)``: carry out the step's action (not the guest's reaction)."""

    def __call__(self, m: M, step: StepSpec, index: int) -> Outcome[M]: ...


_KEPT = "; removed at exit (set path to keep it)"


def _resize(m: M, step: StepSpec, index: int) -> Outcome[M]:
    for dev_id, size in step.requested:
        m.set_requested_size(dev_id, size)
    return Outcome(m)


def _unplug_all(m: M, step: StepSpec, index: int) -> Outcome[M]:
    m.unplug_all(step.device)
    return Outcome(m)


def _system_reset(m: M, step: StepSpec, index: int) -> Outcome[M]:
    m.system_reset()
    return Outcome(m)


def _pause(m: M, step: StepSpec, index: int) -> Outcome[M]:
    time.sleep(step.seconds)
    return Outcome(m)


def _snapshot(m: M, step: StepSpec, index: int) -> Outcome[M]:
    d = m.snapshot(step.path)
    note = (
        f"snapshot {d['path']}: {format_size(d['page_bytes'])} of populated memory "
        f"in {d['seconds']:.2f} s, file holds {format_size(d['file_allocated'])}"
        + ("" if step.path else _KEPT)
    )
    return Outcome(m, d, [note])


def _restore(m: M, step: StepSpec, index: int) -> Outcome[M]:
    d = m.restore(step.path)
    note = (
        f"restored {d['path']}: {format_size(d['page_bytes'])} loaded in "
        f"{d['seconds']:.2f} s; every populated byte and the guest's patterns check out"
    )
    return Outcome(m, d, [note])


def _migrate(m: M, step: StepSpec, index: int) -> Outcome[M]:
    dest, d = m.migrate(step.transport, step.path)
    note = (
        f"migrated over {d['transport']}: {format_size(d['page_bytes'])} of populated "
        f"memory ({format_size(d['stream_bytes'])} streamed) in {d['seconds']:.2f} s "
        "to a fresh machine; every populated byte and the guest's patterns check out"
    )
    return Outcome(dest, d, [note])


def _live_migrate(m: M, step: StepSpec, index: int) -> Outcome[M]:
    dest, d = m.live_migrate(
        step.requested, downtime_limit_ms=step.downtime_limit, max_bandwidth=step.max_bandwidth
    )
    rounds = ", ".join(format_size(b) for b in d["round_bytes"])
    note = (
        f"live-migrated over tcp{' with the guest writing' if d['writer'] else ''}: {d['rounds']} round(s) "
        f"+ switchover ({rounds}), total {d['total_time']:.3f} s, downtime {d['downtime'] * 1000:.1f} ms, "
        f"{format_size(d['transferred'])} transferred for {format_size(d['populated'])} populated "
        "at the start; "
        f"digests equal on both ends ({d['digest'][:16]})"
    )
    if d["resized_after_round"] is not None:
        note += (
            f"; requested-size changed during round {d['resized_after_round'] + 1}: plugged "
            f"{format_size(d['plugged_before'])} -> {format_size(d['plugged_at_switchover'])} "
            "at the switchover"
        )
    if d["fallback"]:
        note += f"; no dirty tracking ({d['fallback']}): full copy at the switchover"
    return Outcome(dest, d, [note])


def _dump(m: M, step: StepSpec, index: int) -> Outcome[M]:
    path = step.path or str(m.files.files_dir() / f"{m.scenario.name}-step{index}.elf")
    d = m.dump(path, durable=bool(step.path))
    note = (
        f"dump {d['path']}: {d['segments']} PT_LOAD segments, "
        f"{format_size(d['bytes'])} (boot RAM + plugged memory only)" + ("" if step.path else _KEPT)
    )
    return Outcome(m, d, [note])


HANDLERS: dict[Action, Handler] = {
    Action.RESIZE: _resize,
    Action.UNPLUG_ALL: _unplug_all,
    Action.SYSTEM_RESET: _system_reset,
    Action.PAUSE: _pause,
    Action.SNAPSHOT: _snapshot,
    Action.RESTORE: _restore,
    Action.MIGRATE: _migrate,
    Action.LIVE_MIGRATE: _live_migrate,
    Action.DUMP: _dump,
}
"""The handler of each action."""


def run_step(m: M, step: StepSpec, index: int = 0, on_request: OnRequest | None = None) -> StepResult[M]:
    """Apply ``step`` to ``m`` and let the guest react; see the module rules."""
    t0 = time.monotonic()
    out = HANDLERS[step.action](m, step, index)
    target = out.machine
    notes = list(out.notes)
    exchanges: list[Exchange] = []
    if not target.running:
        exchanges = target.run_guest(on_request=on_request)
    elif not target.wait_converged():
        notes.append("the guest thread stopped before the drivers converged (see the log)")
    responses: dict[str, int] = {}
    for ex in exchanges:
        name = ex.response_name.lower()
        responses[name] = responses.get(name, 0) + 1
    with target.lock:
        for dev_id, drv in target.drivers.items():
            requested = target.devices[dev_id].requested_size
            if drv.state is DriverState.WAITING:
                notes.append(f"{dev_id}: guest driver waits for its retry timer (device answered BUSY)")
            elif drv.state is DriverState.BROKEN:
                notes.append(f"{dev_id}: guest driver broken: {drv.broken_reason}")
            elif drv.plugged_size != requested:
                notes.append(f"{dev_id}: guest stopped at {drv.plugged_size:#x} of {requested:#x}")
    status = target.status()
    return StepResult(
        index=index,
        label=step.describe(),
        seconds=time.monotonic() - t0,
        requests=len(exchanges),
        responses=responses,
        converged=target.converged(),
        status=status,
        notes=notes,
        details=out.details,
        machine=target if target is not m else None,
    )
