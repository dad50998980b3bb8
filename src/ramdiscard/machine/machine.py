"""Machine: a VM's guest memory on real host memory, built from a scenario.

Rules:

* :meth:`Machine.from_scenario` builds, in QEMU's order (:mod:`ramdiscard.machine.build`):
  a memory system of the machine's own (:attr:`Machine.system`: its topology lock,
  address space, RAM-block registry and DiscardPolicy are nobody else's, so machines in
  one process are independent), boot RAM and the virtio-mem devices, the consumers, the
  guest drivers and workload. Any failure releases everything built so far and raises.
* A consumer with ``coordinate-discards = false`` models a VMM that ignores the
  RamDiscardManager; it gets a policy of its own (:attr:`Machine.uncoordinated_policy`)
  and the machine says so in :attr:`Machine.notes`.
* The guest drives the devices only through request bytes. The host side changes only
  ``requested-size`` (:meth:`set_requested_size`) and resets; the drivers then converge,
  either synchronously (:meth:`run_guest`, :meth:`run_step`) or in a background thread
  (:meth:`start`) that reacts to config changes and to its retry timers.
* Snapshot, restore, migrate and dump (:mod:`ramdiscard.machine.checkpoint`; steps, or
  the methods of the same names) hold the machine lock throughout, so the guest sends
  nothing meanwhile; the guest model travels with a snapshot or a migration, and each
  checks integrity afterwards (MigrationError if not).
* Every public method takes :attr:`Machine.lock` (an RLock); a QMP server or UI thread can
  call them concurrently with the background thread.
* :meth:`close` is idempotent and never raises: it stops the thread, detaches consumers
  (unpins, unmaps, deletes memslots), unmaps and unrealizes the devices, closes the RAM
  blocks and removes files the machine created (:mod:`ramdiscard.machine.files`). Host
  memory, pins and files do not outlive it.

Figures: :meth:`status` and :meth:`sample` (:mod:`ramdiscard.machine.figures`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ramdiscard import interrupts
from ramdiscard.errors import InvalidArgument
from ramdiscard.guest import DriverState, Exchange
from ramdiscard.hostmem import proc_status
from ramdiscard.machine import checkpoint, figures
from ramdiscard.machine.build import build
from ramdiscard.machine.parts import Fingerprint, MachineParts, OnRequest
from ramdiscard.machine.scenario import Scenario, StepSpec, Transport
from ramdiscard.machine.steps import StepResult, run_step
from ramdiscard.migration.precopy import PrecopyStats

log = logging.getLogger("ramdiscard.machine")


class Machine(MachineParts):
    """A machine built from a :class:`Scenario`: its parts (:class:`MachineParts`), a guest
    thread and the control methods; see the module rules. Use :meth:`from_scenario`, then
    :meth:`close` (or a ``with`` block)."""

    def __init__(self, scenario: Scenario, *, workdir: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        super().__init__(scenario, workdir=workdir, clock=clock)
        self.on_request: OnRequest | None = None
        self.on_migration: Callable[[PrecopyStats], None] | None = None
        """Called with a live migration's figures at every progress report."""
        """Called with the precopy's figures (PrecopyStats) while a live migration runs."""
        self._closed = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._idle = threading.Condition(self.lock)

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario,
        *,
        workdir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Machine:
        """Build the machine. Raises InvalidArgument/RamDiscardError/OSError with a clear
        message when something cannot be built; nothing is left held then."""
        m = cls(scenario, workdir=workdir, clock=clock)
        try:
            build(m)
        except BaseException:
            m.close()
            raise
        return m

    @property
    def running(self) -> bool:
        """Whether the background guest thread runs."""
        return self._thread is not None

    # -- host-side control ----------------------------------------------------------------

    def get_requested_size(self, dev_id: str) -> int:
        with self.lock:
            return self.device(dev_id).requested_size

    def set_requested_size(self, dev_id: str, size: int) -> None:
        """Set ``requested-size``; the guest reacts (now in thread mode, else on the next
        :meth:`run_guest`). Raises KeyError / InvalidArgument (nothing changed)."""
        with self.lock:
            self._check_open()
            self.device(dev_id).requested_size = size
        self._wake.set()

    def sizes(self, dev_id: str) -> dict[str, int]:
        """block-size, region size, usable, plugged ("size") and requested sizes, in bytes."""
        with self.lock:
            return figures.sizes(self, dev_id)

    def system_reset(self) -> None:
        """Full system reset: every device unplugs everything; the guest reboots (fresh
        drivers that start over towards the requested sizes)."""
        with self.lock:
            self._check_open()
            for dev_id, dev in self.devices.items():
                dev.system_reset()
                self.new_driver(dev_id)
            if self.workload is not None:
                self.workload.unplugged_all()
        self._wake.set()

    def unplug_all(self, dev_id: str | None = None) -> None:
        """The guest driver (re)starts and sends UNPLUG_ALL first (models a driver reload)."""
        with self.lock:
            self._check_open()
            for i in [dev_id] if dev_id else list(self.devices):
                self.device(i)
                self.drivers[i].request_unplug_all()
        self._wake.set()

    # -- running the guest ----------------------------------------------------------------

    def run_guest(self, max_requests: int = 1_000_000, on_request: OnRequest | None = None) -> list[Exchange]:
        """Let every guest driver work until none has anything to send now (converged,
        waiting on its retry timer, or broken). Returns the exchanges, in order."""
        out: list[Exchange] = []
        cb = on_request or self.on_request
        progress = True
        while progress and len(out) < max_requests:
            progress = False
            for dev_id in list(self.devices):
                with self.lock:
                    self._check_open()
                    ex = self.drivers[dev_id].step()
                    if ex is not None:
                        self._requests += 1
                if ex is None:
                    continue
                progress = True
                out.append(ex)
                if cb is not None:
                    cb(dev_id, ex)
        return out

    def converged(self) -> bool:
        """True when no driver has work it could do now."""
        with self.lock:
            return all(d.state is not DriverState.WORKING for d in self.drivers.values())

    def run_step(
        self, step: StepSpec, index: int = 0, on_request: OnRequest | None = None
    ) -> StepResult[Machine]:
        """Apply one scenario step and let the guest react (:mod:`ramdiscard.machine.steps`).

        A ``migrate`` step returns the destination in :attr:`StepResult.machine` and closes
        this machine; the guest then runs on the destination."""
        return run_step(self, step, index, on_request)

    # -- snapshot, restore, migrate, dump -------------------------------------------------

    def fingerprint(self) -> Fingerprint:
        """Checksums of every populated run of every RAM block (boot RAM whole, device
        RAM per plugged run). Reads memory in place; never touches discarded memory."""
        with self.lock:
            return checkpoint.fingerprint(self)

    def snapshot(self, path: str | None = None) -> dict[str, Any]:
        """Save the machine (RAM of every block, device states) to ``path`` (default: a
        file in the machine's snapshot directory, removed at close) as a sparse snapshot;
        remember the guest model's state with it. Returns the figures."""
        with self.lock:
            self._check_open()
            return checkpoint.snapshot(self, path)

    def restore(self, path: str | None = None) -> dict[str, Any]:
        """Load a snapshot into this machine, as QEMU's loadvm: every device is reset to
        all-unplugged, then RAM and device states are loaded (consumers follow through the
        usual populate notifications) and the guest continues from the snapshot.

        Without ``path``, the latest :meth:`snapshot`. A snapshot file this machine did
        not write restores memory and devices; the guest model then restarts (a fresh
        driver that finds memory plugged and sends UNPLUG_ALL first). Raises
        MigrationError (bad file, integrity) or InvalidArgument (no snapshot)."""
        with self.lock:
            self._check_open()
            figures_ = checkpoint.restore(self, path)
        self._wake.set()
        return figures_

    def migrate(
        self, transport: Transport | str = Transport.FILE, path: str | None = None
    ) -> tuple[Machine, dict[str, Any]]:
        """Migrate to a fresh machine built from the same scenario, through a file (``path``,
        default a temporary one) or a TCP connection on the loopback; check integrity there
        and continue with the destination (guest model included). On success this machine
        is closed and the destination returned (its guest thread runs if this one's did);
        on failure the destination is closed and this machine is unchanged."""
        transport = Transport(transport)
        with self.lock:
            self._check_open()
            was_running = self.running
            dest = Machine.from_scenario(self.scenario, clock=self.clock)
            try:
                figures_ = checkpoint.transfer(self, dest, transport, path)
            except BaseException:
                dest.close()
                raise
        self._hand_over(dest, was_running)
        return dest, figures_

    def live_migrate(
        self,
        requested: tuple[tuple[str, int], ...] = (),
        *,
        downtime_limit_ms: int = 300,
        max_bandwidth: int = 0,
    ) -> tuple[Machine, dict[str, Any]]:
        """Migrate live to a fresh machine built from the same scenario, the guest running
        and writing meanwhile, ``requested`` sizes set once it is active
        (:mod:`ramdiscard.machine.live`). On success this machine is closed and the
        destination returned (its guest thread runs if this one's did before); on
        failure the destination is closed and this machine runs on as before."""
        from ramdiscard.machine.live import transfer_live

        self._check_open()
        was_running = self.running
        dest = Machine.from_scenario(self.scenario, clock=self.clock)
        try:
            figures_ = transfer_live(
                self, dest, self, requested, downtime_limit_ms=downtime_limit_ms, max_bandwidth=max_bandwidth
            )
        except BaseException:
            dest.close()
            raise
        self._hand_over(dest, was_running)
        return dest, figures_

    def _hand_over(self, dest: Machine, was_running: bool) -> None:
        """Continue on ``dest`` after a migration: it takes the callbacks and the request
        count, this machine closes, and ``dest``'s guest thread runs if this one's did."""
        dest.on_request = self.on_request
        dest.on_migration = self.on_migration
        dest._requests = self._requests
        self.close()
        if was_running:
            dest.start()

    def dump(self, path: str, *, durable: bool = True) -> dict[str, Any]:
        """Write an ELF core of the populated guest memory to ``path``
        (:func:`ramdiscard.dump.dump_guest_memory`: mode 0600, a non-regular path or one
        backing guest memory refused); check it holds exactly boot RAM plus plugged
        memory. Returns the figures."""
        with self.lock:
            self._check_open()
            return checkpoint.dump(self, path, durable=durable)

    def start(self) -> None:
        """Run the guest drivers in a daemon thread that reacts to requested-size changes
        and retry timers until :meth:`stop` or :meth:`close`."""
        with self.lock:
            self._check_open()
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ramdiscard-guest", daemon=True)
            self._thread.start()
            if self.writer is not None:
                self.writer.start()

    def resume_incoming(self) -> None:
        """After an incoming migration loaded this machine's memory and device states:
        the guest drivers resume with what is plugged (their state travelled with the
        guest), and the guest thread (and writer) starts."""
        with self.lock:
            self._check_open()
            for dev_id, dev in self.devices.items():
                drv = self.new_driver(dev_id)
                drv.assume_plugged([(dev.addr + s, n) for s, n in dev.plugged_ranges()])
        self.start()

    def stop(self) -> None:
        """Stop the writer and the guest thread (if running) and wait for the thread."""
        if self.writer is not None:
            self.writer.stop()
        t = self._thread
        if t is None:
            return
        self._stop.set()
        self._wake.set()
        t.join()
        self._thread = None

    def wait_converged(self, timeout: float | None = None) -> bool:
        """Block until the drivers have nothing to do now (thread mode). True if so; False
        when ``timeout`` s pass first or the guest thread is not running (it stopped on
        an error, or was never started) while a driver still has work."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while not self.converged():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                t = self._thread
                if t is None or not t.is_alive():
                    return False
                self._idle.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_guest(max_requests=256)
            except Exception:
                log.exception("guest driver thread stopped")
                return
            with self._idle:
                if self.converged():
                    self._idle.notify_all()
                    timers = [d.retry_at for d in self.drivers.values() if d.retry_at is not None]
                else:
                    continue
            wait = None if not timers else max(0.0, min(timers) - self.clock())
            self._wake.wait(min(wait, 1.0) if wait is not None else 1.0)
            self._wake.clear()

    # -- figures --------------------------------------------------------------------------

    def sample(self) -> dict[str, int]:
        """Cheap figures for time series: plugged, rss, vm_pin, vm_lck, dma mappings."""
        ps = proc_status()
        with self.lock:
            return figures.sample(self, ps)

    def status(self) -> dict[str, Any]:
        """All figures, bytes and counts (:mod:`ramdiscard.machine.figures`)."""
        ps = proc_status()
        with self.lock:
            return figures.status(self, ps)

    # -- teardown -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("machine is closed")

    def close(self) -> None:
        """Release everything (see the module rules). Idempotent; raises nothing of its
        own. SIGINT/SIGTERM cannot interrupt it (:func:`ramdiscard.interrupts.deferred`):
        one arriving meanwhile raises KeyboardInterrupt once everything is released."""
        if self._closed:
            return
        with interrupts.deferred():
            self._close()

    def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self.stop()
        with self.lock:
            for c in reversed(self.consumers):
                with contextlib.suppress(Exception):
                    c.close()
            self.consumers.clear()
            for mr in reversed(self.mapped):
                try:
                    self.root.del_subregion(mr)
                except Exception:
                    log.exception("unmapping %s failed", mr.name)
            self.mapped.clear()
            for dev in self.devices.values():
                try:
                    dev.unrealize()
                except Exception:
                    log.exception("unrealizing %s failed", dev.id)
            if self.space is not None:
                self.space.destroy()
            # Files go while their blocks still hold the lock on them.
            self.files.remove_created()
            for b in self.blocks:
                with contextlib.suppress(Exception):
                    b.close()
            self.files.remove_dirs()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
