"""Playing a real-guest scenario: boot the guest, run the steps, measure after each.

Rules:

* :func:`run_guest_scenario` boots a :class:`~ramdiscard.realguest.launcher.RealGuest` as
  the scenario's ``[guest]`` describes, measures once the guest has settled (row
  ``boot``), then plays each step and measures again: the guest's MemTotal, the device's
  plugged size, the consumers' pinned bytes and this process's VmPin above its start, the
  device region's resident bytes in the memfd. The guest is always closed on the way out
  (also when a step fails or on Ctrl-C).
* Settled (:func:`settle`) means: plugged size == requested size, the pins equal it, and
  three consecutive MemTotal reports, a second apart, agree; every wait is bounded by the
  step's ``timeout`` and raises :class:`RealGuestError` (one line) when it runs out.
* resize: set requested-size (config-change message), then settle. system-reset: QEMU's
  ``system_reset`` (its RESET event unplugs everything before the command returns; the
  plugged size seen then is reported as a note), wait for the rebooted guest, settle.
  run: send the command to the guest's init and wait for its completion line, then
  settle. wait: settle.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ramdiscard.machine.scenario.realguest import GuestAction, GuestScenario, GuestStepSpec
from ramdiscard.realguest.launcher import RealGuest, RealGuestError, Sizes

_DONE = {"touch": "RAMDISCARD-TOUCHED", "free": "RAMDISCARD-FREED", "memtotal": "RAMDISCARD-MEMTOTAL"}


@dataclass(frozen=True)
class GuestStepResult:
    label: str
    requested: int
    sizes: Sizes
    seconds: float
    notes: tuple[str, ...] = field(default=())


def settle(g: RealGuest, timeout: float) -> Sizes:
    """Wait (each condition bounded by ``timeout`` s) until the guest has settled at the
    device's requested size (module rules), then measure."""
    size = g.device.requested_size
    g.wait_for(lambda: g.device.plugged_size == size, timeout, f"plugged size {size:#x}")
    if g.dma is not None:
        g.wait_for(lambda: g.pinned_bytes == size, timeout, "the pins to follow")
    readings: list[int] = []

    def stable() -> bool:
        g.send("memtotal")
        time.sleep(1.0)
        try:
            readings.append(g.guest_memtotal())
        except RealGuestError:
            return False
        return len(readings) >= 3 and readings[-1] == readings[-2] == readings[-3]

    g.wait_for(stable, timeout, "a stable guest MemTotal")
    return g.sizes()


def play_step(g: RealGuest, step: GuestStepSpec) -> tuple[str, ...]:
    """Carry out one step (not the final settle); returns notes for the report."""
    if step.action is GuestAction.RESIZE:
        assert step.requested_size is not None
        g.set_requested_size(step.requested_size)
    elif step.action is GuestAction.SYSTEM_RESET:
        if g.qmp is None:
            raise RealGuestError("system-reset: QEMU's QMP connection is closed")
        mark = len(g.console)
        g.qmp.execute("system_reset", timeout=step.timeout)
        plugged = g.device.plugged_size
        g.wait_console("RAMDISCARD-READY", step.timeout, after=mark)
        return (f"plugged {plugged} bytes when system_reset returned (before the guest re-plugged)",)
    elif step.action is GuestAction.RUN:
        assert step.command is not None
        mark = len(g.console)
        g.send(step.command)
        g.wait_console(_DONE[step.command.split()[0]], step.timeout, after=mark)
    return ()


def run_guest_scenario(
    sc: GuestScenario,
    *,
    on_step: Callable[[GuestStepResult], None] | None = None,
    on_console: Callable[[str], None] | None = None,
) -> list[GuestStepResult]:
    """Boot, play every step, close; returns one result per row (``boot`` first). Raises
    what :class:`RealGuest` raises when the guest cannot start (QemuNotFound, ...) and
    RealGuestError when a step's wait runs out."""
    spec = sc.guest
    results: list[GuestStepResult] = []

    def record(label: str, requested: int, sizes: Sizes, started: float, notes: tuple[str, ...]) -> None:
        result = GuestStepResult(label, requested, sizes, time.monotonic() - started, notes)
        results.append(result)
        if on_step is not None:
            on_step(result)

    started = time.monotonic()
    g = RealGuest(
        region_size=spec.region_size, requested_size=spec.requested_size, boot_timeout=spec.boot_timeout,
        on_console=on_console, ram_size=spec.ram, block_size=spec.block_size, kernel=spec.kernel,
        initramfs=spec.initramfs, consumers=spec.consumers,
    )  # fmt: skip
    try:
        notes: tuple[str, ...] = ()
        if not g.qemu_maps_memfd():
            notes = ("QEMU does not map ramdiscard's memfd over the device region",)
        record("boot", spec.requested_size, settle(g, spec.boot_timeout), started, notes)
        for step in sc.steps:
            started = time.monotonic()
            notes = play_step(g, step)
            sizes = settle(g, step.timeout)
            record(step.describe(), g.device.requested_size, sizes, started, notes)
    finally:
        g.close()
    return results
