"""Live migration of a machine to a fresh machine of the same scenario (step
``live-migrate``), with the guest running and writing meanwhile.

Rules:

* The source's guest thread and writer run for the migration (started if they were
  not); :func:`ramdiscard.migration.precopy.precopy_to` sends over a loopback TCP
  connection to :func:`ramdiscard.migration.live_load.receive_live` on a thread loading
  the destination. Plug and unplug stay allowed during the live rounds (beyond QEMU:
  ``allow_resize`` with the machine lock as the guard); ``requested`` sizes are set on
  the source once the migration is active, and the guest plugs or unplugs while its
  memory is being sent.
* The switchover pauses the guest by stopping the guest thread and the writer (the
  vCPUs): memory and plugged state then stay as sent. A failure resumes them (the
  precopy does) and puts the source back in the mode it had (thread running or not).
* After success, with the source still stopped: the guest model moves to the
  destination (:func:`~ramdiscard.machine.checkpoint.adopt_guest`), the fingerprints
  and the populated-memory digests (:func:`ramdiscard.migration.digest.memory_digest`)
  of both ends must be equal and the guest's touch patterns equally intact on both
  (the writer may have overwritten some on the source; the destination must show the
  same); otherwise MigrationError, and the source is put back in the mode it had, as
  after a failed transfer (also when the destination's load has not ended within the
  timeout). Chunks the writer overwrote leave the destination's
  touch workload (their content is the writer's), so later integrity checks hold. The
  caller closes the source and continues with the destination.
* ``control.on_migration`` (when set) gets the precopy's figures at every progress report.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any, Protocol

from ramdiscard.machine.checkpoint import adopt_guest, capture_guest, fingerprint
from ramdiscard.machine.parts import MachineParts
from ramdiscard.migration import MigrationError
from ramdiscard.migration.digest import memory_digest
from ramdiscard.migration.live_load import LiveLoadStats, receive_live
from ramdiscard.migration.precopy import PrecopyParams, PrecopyStats, precopy_to
from ramdiscard.migration.transport import IO_TIMEOUT


class LiveControl(Protocol):
    """How a live migration runs and pauses the source machine's guest
    (:class:`ramdiscard.machine.Machine` is one; see its methods for the contracts)."""

    @property
    def running(self) -> bool: ...

    @property
    def on_migration(self) -> Callable[[PrecopyStats], None] | None: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def set_requested_size(self, dev_id: str, size: int) -> None: ...


class _Vcpus:
    """GuestControl of a machine: its guest thread and writer."""

    def __init__(self, m: LiveControl) -> None:
        self.m = m

    def pause(self) -> None:
        self.m.stop()

    def resume(self) -> None:
        self.m.start()


def transfer_live(
    m: MachineParts,
    dest: MachineParts,
    control: LiveControl,
    requested: tuple[tuple[str, int], ...] = (),
    *,
    downtime_limit_ms: int = 300,
    max_bandwidth: int = 0,
    timeout: float = IO_TIMEOUT,
) -> dict[str, Any]:
    """Live-migrate ``m`` into the fresh ``dest`` (module rules); the figures. Raises
    MigrationError (or the transport's error) when the transfer or the check of both ends
    fails; ``dest`` is then the caller's to close and ``m`` runs on as before (its guest
    thread and writer running again if they were)."""
    was_running = control.running
    params = PrecopyParams(
        downtime_limit=downtime_limit_ms / 1000.0, max_bandwidth=max_bandwidth, allow_resize=True
    )
    result: dict[str, Any] = {}
    resized: list[int] = []
    before = sum(d.plugged_size for d in m.devices.values())

    def progress(st: PrecopyStats) -> None:
        if control.on_migration is not None:
            control.on_migration(st)
        if requested and not resized and st.status == "active":
            resized.append(st.rounds)
            for dev_id, size in requested:
                control.set_requested_size(dev_id, size)

    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                result["load"] = receive_live(
                    ls, dest.space_or_fail(), list(dest.devices.values()), accept_timeout=timeout,
                    read_timeout=timeout,
                )  # fmt: skip
            except BaseException as exc:  # re-raised in the caller's thread
                result["error"] = exc

        t = threading.Thread(target=receive, name="ramdiscard-live-receive", daemon=True)
        t.start()
        control.start()
        try:
            stats = precopy_to(
                "127.0.0.1", port, m.space_or_fail(), list(m.devices.values()), _Vcpus(control), params,
                progress=progress, timeout=timeout, io_timeout=timeout, guard=m.lock,
            )  # fmt: skip
        except BaseException:
            if not was_running:
                control.stop()
            raise
        finally:
            t.join(timeout)
    try:
        return _verify(m, dest, stats, _loaded(t, result, timeout), before, resized)
    except BaseException:
        if was_running:
            control.start()
        raise


def _loaded(t: threading.Thread, result: dict[str, Any], timeout: float) -> LiveLoadStats:
    """The destination's load figures, or what stopped the load."""
    if "error" in result:
        raise result["error"]
    if t.is_alive():
        raise MigrationError(f"live-migrate: the destination did not finish loading within {timeout:g} s")
    load: LiveLoadStats = result["load"]
    return load


def _verify(
    m: MachineParts,
    dest: MachineParts,
    stats: PrecopyStats,
    load: LiveLoadStats,
    before: int,
    resized: list[int],
) -> dict[str, Any]:
    """Both ends hold the same memory and guest (module rules); the figures."""
    with m.lock:
        state = capture_guest(m)
        src_digest = memory_digest(m.space_or_fail(), list(m.devices.values()))
        src_broken = m.workload.verify() if m.workload is not None else []
        plugged = sum(d.plugged_size for d in m.devices.values())
    with dest.lock:
        adopt_guest(dest, state)
        if fingerprint(dest) != state.fingerprint:
            raise MigrationError("live-migrate: the destination's memory differs from the source's")
        dst_digest = memory_digest(dest.space_or_fail(), list(dest.devices.values()))
        if dst_digest != src_digest:
            raise MigrationError("live-migrate: the memory digests of both ends differ")
        dst_broken = dest.workload.verify() if dest.workload is not None else []
        if dst_broken != src_broken:
            raise MigrationError("live-migrate: the guest's written patterns differ between both ends")
        for k in dst_broken:  # the writer's now: no longer checked for the touch pattern
            assert dest.workload is not None
            dest.workload.unplugging(k * dest.workload.chunk_size, dest.workload.chunk_size)
        dst_plugged = sum(d.plugged_size for d in dest.devices.values())
    return {
        "transport": "tcp",
        "rounds": stats.rounds,
        "round_bytes": stats.round_bytes,
        "total_time": round(stats.total_time, 4),
        "downtime": round(stats.downtime, 5),
        "setup_time": round(stats.setup_time, 4),
        "transferred": stats.stream_bytes,
        "page_bytes": stats.page_bytes,
        "populated": stats.total_bytes,
        "received_rounds": load.rounds,
        "fallback": stats.fallback,
        "digest": src_digest["sha256"],
        "digests_equal": True,
        "plugged_before": before,
        "plugged_at_switchover": plugged,
        "destination_plugged": dst_plugged,
        "resized_after_round": resized[0] if resized else None,
        "writer": m.writer is not None and m.writer.rate > 0,
        "patterns_overwritten": len(dst_broken),
    }
