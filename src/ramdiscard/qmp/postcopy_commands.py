"""QEMU's postcopy QMP interface on :class:`~ramdiscard.qmp.migration_commands.LiveMachineBackend`.

Rules (QEMU qapi/migration.json; the migration itself is
:mod:`ramdiscard.migration.postcopy_source` / :mod:`~ramdiscard.migration.postcopy_dest`):

* Source, capability ``postcopy-ram`` set: ``migrate`` {uri: ``tcp:...``} starts a
  precopy (status ``active``, ``MIGRATION_PASS`` per round, ``downtime-limit`` and
  ``max-bandwidth`` apply) that completes as a precopy if it converges first.
  ``migrate-start-postcopy`` (refused unless such a migration is running) switches over
  at any point of the rounds: ``postcopy-active`` (the guest is stopped here and runs on
  the destination, which kept the pages sent and not written since), then ``completed``
  (run state ``postmigrate``) once the destination confirmed every page.
  ``postcopy-preempt`` answers page requests on the priority channel (a second
  connection); without it they queue behind the background pages on the main
  channel (the priority channel still carries the requests).
* The virtio-mem devices answer BUSY from ``migrate`` to the end on the source, from the
  connection to the end on the destination (QEMU's ``virtio_mem_is_busy``; with
  ``postcopy-ram`` the precopy rounds do not follow resizes either).
* A failure or ``migrate_cancel`` after the switchover: status ``failed`` /
  ``cancelled``, the source guest stays stopped (run state ``paused``, memory, pins and
  plugged state intact; ``cont`` resumes it as of the switchover), because the
  destination may have run the guest meanwhile. The destination treats it as
  unrecoverable (as QEMU does): its guest is stopped for good (run state ``paused``),
  its memory reset to all discarded, status ``failed``.
* Destination: a postcopy connection is accepted only with ``postcopy-ram`` set there
  too (else refused, nothing changed). The guest starts at the switchover (run state
  ``running``; ``paused`` when the server was started paused), status
  ``postcopy-active``, then ``completed``; a precopy that converged without a switchover
  ends as any precopy does. ``query-migrate`` there has ``x-ramdiscard-postcopy``:
  faults, zero-page faults, requests, fault latency p50/p99 in microseconds, and the
  bytes kept from the precopy, still needed and dropped at the switchover.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Protocol

from ramdiscard import migration
from ramdiscard.migration.postcopy_dest import PostcopyDestStats, receive_postcopy
from ramdiscard.migration.postcopy_source import PostcopySource, PostcopyStats
from ramdiscard.migration.precopy import PrecopyParams, PrecopyStats
from ramdiscard.qmp.machine_backend import MachineLike
from ramdiscard.qmp.protocol import QmpError


class PostcopyBackend(Protocol):
    """What the postcopy commands use of the QMP migration backend
    (:class:`~ramdiscard.qmp.migration_commands.LiveMachineBackend` is one; see it for
    the contracts)."""

    machine: MachineLike
    caps: dict[str, bool]
    params: dict[str, int]
    mstatus: str
    run_state: str
    start_paused: bool
    stats: PrecopyStats | None
    error: str | None
    migrate_timeout: float
    postcopy_source: PostcopySource | None
    postcopy_dest: PostcopyDestStats | None

    def set_status(self, status: str) -> None: ...

    def adopt_postcopy_source(self, src: PostcopySource) -> None: ...

    def finish(self, ok: bool) -> None: ...

    def pass_event(self, number: int) -> None: ...


def start_postcopy(b: PostcopyBackend) -> dict[str, Any]:
    src = b.postcopy_source
    if src is None or b.mstatus not in ("setup", "active"):
        raise QmpError("Postcopy must be started after migration has been started with postcopy-ram set")
    src.start.set()
    return {}


def run_source(b: PostcopyBackend, guest: Any, host: str, port: int) -> None:
    """The ``migrate`` thread of a postcopy (module rules)."""
    m = b.machine
    with m.lock:
        devices = list(m.devices.values())
        space = m.space

    seen = [0]

    def progress(st: PostcopyStats) -> None:
        b.stats = st
        if st.status != b.mstatus and st.status in ("active", "postcopy-active"):
            b.set_status(st.status)
        if st.rounds > seen[0]:
            seen[0] = st.rounds
            b.pass_event(st.rounds)

    params = PrecopyParams(
        downtime_limit=b.params["downtime-limit"] / 1000.0, max_bandwidth=b.params["max-bandwidth"]
    )
    src = PostcopySource(
        space, devices, host, port, guest, preempt=b.caps["postcopy-preempt"], params=params,
        timeout=b.migrate_timeout, io_timeout=b.migrate_timeout, progress=progress,
    )  # fmt: skip
    b.stats = src.stats
    b.adopt_postcopy_source(src)
    ok = False
    try:
        src.run()
        ok = True
        b.run_state = "postmigrate"
    except (OSError, migration.MigrationError) as exc:
        b.error = str(exc)
        if src.stats.switched:  # stopped for good here; `cont` restarts it
            guest.resume()
            stop = getattr(m, "stop", None)
            if callable(stop):
                stop()
            b.run_state = "paused"
    finally:
        b.postcopy_source = None
        b.finish(ok)


class _VfioPins:
    def __init__(self, consumer: Any, space: Any) -> None:
        self.consumer, self.space = consumer, space

    def detach(self) -> None:
        self.consumer.container.detach()

    def attach(self) -> None:
        self.consumer.attach(self.space)


def receive(b: PostcopyBackend, conn: socket.socket, ls: socket.socket) -> bool:
    """A postcopy connection on the destination (module rules); preamble already read.
    Returns False when it ended as a precopy (the caller starts the guest)."""
    m = b.machine
    if not b.caps["postcopy-ram"]:
        from ramdiscard.migration.tcp import drain_peer
        from ramdiscard.migration.transport import send_status

        with contextlib.suppress(OSError):  # drained: the source's precopy must read the refusal
            send_status(conn, "postcopy-ram is not enabled on the destination")
            drain_peer(conn)
        raise migration.MigrationError("a postcopy arrived but postcopy-ram is not enabled here")
    with m.lock:
        devices = list(m.devices.values())
        space = m.space
        pins = [_VfioPins(c, space) for c in getattr(m, "consumers", []) if c.kind == "vfio"]

    def running() -> None:
        b.set_status("postcopy-active")
        if b.start_paused:
            b.run_state = "paused"
            return
        resume = getattr(m, "resume_incoming", None)
        if callable(resume):
            resume()
        b.run_state = "running"

    def failed() -> None:
        stop = getattr(m, "stop", None)
        if callable(stop):
            stop()
        b.run_state = "paused"

    stats = receive_postcopy(
        conn, ls, space, devices, io_timeout=b.migrate_timeout, pins=pins, on_running=running,
        on_failure=failed, on_round=b.pass_event,
    )  # fmt: skip
    if not stats.switched:
        return False
    b.postcopy_dest = stats
    new_driver = getattr(m, "new_driver", None)
    if b.start_paused and callable(new_driver):
        with m.lock:  # the drivers take over the plugged state; `cont` starts the guest
            for dev_id, dev in m.devices.items():
                drv = new_driver(dev_id)
                drv.assume_plugged([(dev.addr + s, n) for s, n in dev.plugged_ranges()])
    return True


def query_extra(b: PostcopyBackend, out: dict[str, Any]) -> None:
    """Postcopy figures for ``query-migrate`` (module rules)."""
    st = b.stats
    if isinstance(st, PostcopyStats) and "ram" in out:
        out["ram"]["postcopy-requests"] = st.requests
        out["x-ramdiscard-postcopy"] = {
            "requests": st.requests, "request-bytes": st.request_bytes,
            "unplugged-requests": st.unplugged_requests, "background-bytes": st.background_bytes,
            "switched": st.switched, "needed-bytes": st.needed_bytes,
        }  # fmt: skip
    d: PostcopyDestStats | None = b.postcopy_dest
    if d is not None:
        lat = sorted(d.latencies)

        def pct(q: float) -> int:
            return int(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6) if lat else 0

        out["x-ramdiscard-postcopy"] = {
            "faults": d.faults, "zero-page-faults": d.zero_faults, "requests": d.requests,
            "fault-latency-p50-us": pct(0.5), "fault-latency-p99-us": pct(0.99),
            "background-bytes": d.background_bytes, "priority-bytes": d.priority_bytes,
            "total-time": int(d.seconds * 1000), "kept-bytes": d.kept_bytes,
            "needed-bytes": d.needed_bytes, "dropped-bytes": d.dropped_bytes,
        }  # fmt: skip
