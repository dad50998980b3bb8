"""QEMU's live-migration QMP interface for a scenario machine.

Rules (QEMU qapi/migration.json shapes):

* :class:`LiveMachineBackend` is a :class:`MachineBackend` with these commands:
  ``migrate`` {uri: ``tcp:HOST:PORT`` precopy with the guest running, ``file:PATH`` a
  sparse snapshot of the machine as it is}, which returns ``{}`` at once while the
  migration runs on a thread of its own; ``migrate-incoming`` {uri} (only when started
  with ``--incoming defer``); ``migrate-set-capabilities``; ``migrate-set-parameters``
  (``downtime-limit`` ms, ``max-bandwidth`` bytes/s, also applied to a running
  migration); ``query-migrate``,
  ``query-migrate-capabilities``, ``query-migrate-parameters``; ``migrate_cancel``;
  ``x-ramdiscard-memory-digest``. It keeps the run state (``run_state``, adding
  ``inmigrate`` and ``postmigrate``) that the dispatcher's ``query-status``, ``stop`` and
  ``cont`` read and set.
* Events: ``MIGRATION`` {status} at every status change (setup, active, device,
  completed, failed, cancelled), ``MIGRATION_PASS`` {pass} after every precopy round.
* Source: after ``completed`` the guest stays stopped (run state ``postmigrate``); on
  failure or cancel the guest runs on with its memory, pins and plugged state intact.
  Destination: run state ``inmigrate`` until the stream is loaded, then the guest
  starts (``running``), or stays ``paused`` when the server was started paused.
* Capability ``x-ramdiscard-resize-during-migration`` (on by default, beyond QEMU):
  during the precopy rounds ``qom-set requested-size`` takes effect on the source (the
  guest plugs and unplugs; the destination follows); off, the devices answer BUSY from
  setup to the end as in QEMU.
* Capability ``background-snapshot`` with ``migrate`` {uri: ``file:PATH``}: a sparse
  snapshot of memory as of the start while the guest keeps running
  (:func:`ramdiscard.migration.snapshot.background_snapshot`: only populated ranges
  are write-protected; the guest is paused only while they are); the run state stays
  ``running``; ``migrate_cancel`` stops it (file left empty). With ``tcp:`` it is refused.
  It is refused too while a consumer holds DMA pins on guest memory (a vfio container
  or block DMA mapper; the bookkeeping-only ``null`` backend models such pins too):
  write protection cannot see a device's DMA writes, so the file would not hold
  memory as of the start. ``migrate-set-capabilities`` refuses to set it then, and
  ``migrate`` checks again before anything is protected (pins may have appeared
  since); the reply is QEMU's "Background-snapshot is not compatible with guest memory
  configuration" with the consumers named, and the machine runs on.
* Capabilities ``postcopy-ram`` and ``postcopy-preempt``, ``migrate-start-postcopy``
  and the ``postcopy-active`` status: :mod:`ramdiscard.qmp.postcopy_commands`.
  ``postcopy-preempt`` without ``postcopy-ram`` is refused by ``migrate``.
* ``x-ramdiscard-memory-digest``: per RAM region, its populated runs and a SHA-256 over
  their content (and the runs); refused while the guest runs (the content moves).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ramdiscard import migration
from ramdiscard.fileio import create_output
from ramdiscard.migration.digest import memory_digest
from ramdiscard.migration.live_load import serve_live
from ramdiscard.migration.postcopy_dest import PostcopyDestStats
from ramdiscard.migration.postcopy_source import PostcopySource
from ramdiscard.migration.postcopy_wire import MAIN_PREAMBLE
from ramdiscard.migration.precopy import PrecopyParams, PrecopySource, PrecopyStats, precopy_to
from ramdiscard.migration.transport import IO_TIMEOUT
from ramdiscard.qmp import postcopy_commands as postcopy
from ramdiscard.qmp.backend import Outcome, Param, check_arguments
from ramdiscard.qmp.events import QmpEvent
from ramdiscard.qmp.machine_backend import MachineBackend, MachineLike
from ramdiscard.qmp.migration_guest import GuestOfMachine, dma_holders
from ramdiscard.qmp.protocol import QmpError

RESIZE_CAP = "x-ramdiscard-resize-during-migration"
CAPABILITIES = ("postcopy-ram", "postcopy-preempt", "background-snapshot", "mapped-ram", RESIZE_CAP)
PAGE = 4096

Handler = Callable[[dict[str, Any]], Outcome]


class LiveMachineBackend(MachineBackend):
    """A machine backend with QEMU's migration commands (module rules)."""

    def __init__(
        self,
        machine: MachineLike,
        *,
        migrate_timeout: float = IO_TIMEOUT,
        incoming: str | None = None,
        start_paused: bool = False,
    ) -> None:
        super().__init__(machine, migrate_timeout=migrate_timeout)
        self.caps = dict.fromkeys(CAPABILITIES, False)
        self.caps[RESIZE_CAP] = True
        self.params = {"downtime-limit": 300, "max-bandwidth": 0}
        self.mstatus = "none"
        self.run_state = "inmigrate" if incoming else "running"
        self.start_paused = start_paused
        self.stats: PrecopyStats | None = None
        self.error: str | None = None
        self._source: PrecopySource | None = None
        self._live_thread: threading.Thread | None = None
        self._emit: Callable[[QmpEvent], None] | None = None
        self._incoming = incoming
        self._incoming_sock: socket.socket | None = None
        self._t0 = 0.0
        self._stopped_by_user = False
        self._snap_cancel = threading.Event()
        self.postcopy_source: PostcopySource | None = None
        self.postcopy_dest: PostcopyDestStats | None = None
        if incoming and incoming != "defer":
            self._listen(incoming)

    # -- plumbing -------------------------------------------------------------------------

    def set_event_sink(self, emit: Callable[[QmpEvent], None]) -> None:
        self._emit = emit

    def _event(self, name: str, data: dict[str, Any]) -> None:
        if self._emit is not None:
            self._emit(QmpEvent(name, data, time.time()))

    def pass_event(self, number: int) -> None:
        """QEMU's ``MIGRATION_PASS`` after precopy round ``number``."""
        self._event("MIGRATION_PASS", {"pass": number})

    def set_status(self, status: str) -> None:
        """Set the migration status and emit QEMU's ``MIGRATION`` event for it."""
        self.mstatus = status
        self._event("MIGRATION", {"status": status})

    def extra_commands(self) -> dict[str, tuple[Handler, tuple[Param, ...]]]:
        def raw(fn: Callable[[dict[str, Any]], Any]) -> Handler:
            return lambda args: Outcome(fn(args))

        return {
            "migrate": (raw(self._cmd_migrate), (Param("uri", "string"), Param("detach", "boolean", False))),
            "migrate-incoming": (raw(self._cmd_incoming), (Param("uri", "string"),)),
            "migrate-set-capabilities": (raw(self._cmd_set_caps), (Param("capabilities", "any"),)),
            "migrate-set-parameters": (
                raw(self._cmd_set_params),
                (Param("downtime-limit", "any", False), Param("max-bandwidth", "any", False)),
            ),
            "migrate-start-postcopy": (raw(lambda _a: postcopy.start_postcopy(self)), ()),
            "query-migrate": (raw(lambda _a: self.query_migrate()), ()),
            "query-migrate-capabilities": (
                raw(lambda _a: [{"capability": k, "state": v} for k, v in self.caps.items()]),
                (),
            ),
            "query-migrate-parameters": (raw(lambda _a: dict(self.params)), ()),
            "x-ramdiscard-memory-digest": (raw(lambda _a: self.memory_digest()), ()),
        }

    # -- commands -------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self.mstatus in ("setup", "active", "device", "postcopy-active")

    def _cmd_migrate(self, args: dict[str, Any]) -> dict[str, Any]:
        uri: str = args["uri"]
        kind, _sep, rest = uri.partition(":")
        tcp = kind == "tcp" and rest.rpartition(":")[2].isdigit()
        if not tcp and not (kind == "file" and rest):
            raise QmpError(f"Invalid migration URI '{uri[:256]}': expected file:PATH or tcp:HOST:PORT")
        if self.caps["postcopy-preempt"] and not self.caps["postcopy-ram"]:
            raise QmpError("Postcopy preempt requires postcopy-ram; migration not started")
        if not tcp and self.caps["postcopy-ram"]:
            raise QmpError("capability postcopy-ram needs a tcp: URI; migration not started")
        if tcp and self.caps["background-snapshot"]:
            raise QmpError("capability background-snapshot needs a file: URI; migration not started")
        if self.caps["background-snapshot"]:
            self._check_no_dma("migration not started")
        if self.run_state in ("inmigrate", "postmigrate"):
            raise QmpError(f"cannot migrate in run state {self.run_state}")
        with self._state:
            if self._closed:
                raise QmpError("the machine is shutting down")
            if self._migrating or self._busy():
                raise QmpError("There's a migration process in progress")
            self._migrating, self._cancelled = True, False
            self._snap_cancel = threading.Event()
        self.stats, self.error, self._t0 = None, None, time.perf_counter()
        self.set_status("setup")
        target = self._run_tcp if tcp else self._run_file
        self._live_thread = threading.Thread(
            target=target, args=(rest,), name="ramdiscard-migrate", daemon=True
        )
        self._live_thread.start()
        return {}

    def adopt_postcopy_source(self, src: PostcopySource) -> None:
        """Make ``src`` the running postcopy (``migrate_cancel`` aborts it); aborted at
        once if a cancel came first."""
        with self._state:
            self.postcopy_source = src
            if self._cancelled:
                src.abort()

    def finish(self, ok: bool) -> None:
        """End the running migration: status ``completed`` when ``ok``, else ``cancelled``
        (after ``migrate_cancel``) or ``failed``; waiters on the machine are woken."""
        with self._state:
            self._migrating, self._sock, self._source = False, None, None
            self._idle.notify_all()
        if ok:
            self.set_status("completed")
        else:
            self.set_status("cancelled" if self._cancelled else "failed")

    def _run_tcp(self, rest: str) -> None:
        host, _s, port = rest.rpartition(":")
        m = self.machine
        if self.caps["postcopy-ram"]:
            postcopy.run_source(self, GuestOfMachine(m), host.strip("[]"), int(port))
            return
        with m.lock:
            devices = list(m.devices.values())
            space = m.space
        params = PrecopyParams(
            downtime_limit=self.params["downtime-limit"] / 1000.0,
            max_bandwidth=self.params["max-bandwidth"],
            allow_resize=self.caps[RESIZE_CAP],
        )
        seen = [0]

        def progress(st: PrecopyStats) -> None:
            self.stats = st
            if st.status == "active" and self.mstatus == "setup":
                self.set_status("active")
            if st.rounds > seen[0]:
                seen[0] = st.rounds
                self.pass_event(st.rounds)

        def started(src: PrecopySource) -> None:
            with self._state:
                self._source, self._sock = src, src.sock
                if self._cancelled:
                    src.cancel.set()
            self.stats = src.stats

        ok = False
        try:
            self.stats = precopy_to(
                host.strip("[]"), int(port), space, devices, GuestOfMachine(m), params,
                progress=progress, timeout=self.migrate_timeout, io_timeout=self.migrate_timeout,
                on_start=started, guard=m.lock,
            )  # fmt: skip
            ok = True
            self.run_state = "postmigrate"
        except (OSError, migration.MigrationError) as exc:
            self.error = str(exc)
        finally:
            self.finish(ok)

    def _run_background(self, path: str) -> None:
        from ramdiscard.migration.snapshot import background_snapshot

        m = self.machine
        with m.lock:
            devices = list(m.devices.values())
            space = m.space
        st = PrecopyStats(status="active")
        self.stats = st
        self.set_status("active")
        with create_output(path, "migration file") as f:
            snap = background_snapshot(
                space, devices, f, GuestOfMachine(m), cancel=self._snap_cancel, timeout=self.migrate_timeout
            )
        st.total_bytes = st.page_bytes = snap.page_bytes
        st.stream_bytes, st.pages_sent = snap.file_size, snap.page_bytes // PAGE
        st.downtime, st.total_time = snap.pause_time, snap.total_time

    def _run_file(self, path: str) -> None:
        ok = False
        if self.caps["background-snapshot"]:
            try:
                self._run_background(path)
                ok = True
            except (OSError, migration.MigrationError) as exc:
                self.error = str(exc)
            finally:
                self.finish(ok)
            return
        try:
            with self.machine.lock:
                devices = list(self.machine.devices.values())
                self.set_status("active")
                with create_output(path, "migration file") as f:
                    migration.save(self.machine.space, devices, f)
            ok = True
        except (OSError, migration.MigrationError) as exc:
            self.error = str(exc)
        finally:
            self.finish(ok)

    def migrate_cancel(self) -> None:
        with self._state:
            if not self._migrating:
                return
            self._cancelled = True
            self._snap_cancel.set()
            if self._source is not None:
                self._source.cancel.set()
            if self.postcopy_source is not None:
                self.postcopy_source.abort()
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def _cmd_set_caps(self, args: dict[str, Any]) -> dict[str, Any]:
        caps = args["capabilities"]
        if not isinstance(caps, list):
            raise QmpError("Invalid parameter type for 'capabilities', expected: array")
        new = dict(self.caps)
        for item in caps:
            if not isinstance(item, dict):
                raise QmpError("Invalid parameter type for 'capabilities', expected: array of objects")
            check_arguments(item, (Param("capability", "string"), Param("state", "boolean")))
            if item["capability"] not in new:
                value = str(item["capability"])[:64]
                raise QmpError(f"Parameter 'capability' does not accept value '{value}'")
            new[item["capability"]] = item["state"]
        if self._busy():
            raise QmpError("There's a migration process in progress")
        if new["background-snapshot"] and not self.caps["background-snapshot"]:
            self._check_no_dma("capability not set")
        self.caps = new
        return {}

    def _check_no_dma(self, outcome: str) -> None:
        """QmpError when a consumer holds DMA pins or mappings (module rules)."""
        with self.machine.lock:
            holders = dma_holders(self.machine)
        if holders:
            raise QmpError(
                "Background-snapshot is not compatible with guest memory configuration: "
                f"{', '.join(holders)}; write protection cannot see device DMA writes, {outcome}"
            )

    def _cmd_set_params(self, args: dict[str, Any]) -> dict[str, Any]:
        new = dict(self.params)
        for key, limit in (("downtime-limit", 2000 * 1000), ("max-bandwidth", (1 << 63) - 1)):
            if key in args:
                v = args[key]
                if isinstance(v, bool) or not isinstance(v, int):
                    raise QmpError(f"Invalid parameter type for '{key}', expected: integer")
                if not 0 <= v <= limit:
                    raise QmpError(f"Parameter '{key}' expects an integer in the range of 0 to {limit}")
                new[key] = v
        self.params = new
        for src in (self._source, self.postcopy_source):  # QEMU applies both to a running one
            if src is not None:
                src.params.downtime_limit = new["downtime-limit"] / 1000.0
                src.params.max_bandwidth = new["max-bandwidth"]
        return {}

    def query_migrate(self) -> dict[str, Any]:
        addr = getattr(self, "incoming_address", None)
        if self.mstatus == "none":
            if addr is not None:
                return {"socket-address": [{"type": "inet", "host": addr[0], "port": str(addr[1])}]}
            return {}
        st = self.stats
        out: dict[str, Any] = {"status": self.mstatus}
        if st is not None:
            elapsed = st.total_time if self.mstatus == "completed" else time.perf_counter() - self._t0
            out["total-time"] = int(elapsed * 1000)
            out["setup-time"] = int(st.setup_time * 1000)
            if self.mstatus == "completed":
                out["downtime"] = round(st.downtime * 1000)
            else:
                out["expected-downtime"] = int(st.expected_downtime * 1000)
            out["ram"] = {
                "transferred": st.stream_bytes,
                "remaining": st.remaining,
                "total": st.total_bytes,
                "normal": st.page_bytes // PAGE,
                "normal-bytes": st.page_bytes,
                "duplicate": 0,
                "dirty-sync-count": st.rounds,
                "mbps": st.bandwidth * 8 / 1e6,
                "dirty-pages-rate": int(st.dirty_rate / PAGE),
                "page-size": PAGE,
            }
            if st.fallback:
                out["x-ramdiscard-fallback"] = st.fallback
        postcopy.query_extra(self, out)
        if self.error and self.mstatus in ("failed", "cancelled"):
            out["error-desc"] = self.error
        return out

    # -- incoming -------------------------------------------------------------------------

    def _cmd_incoming(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._incoming != "defer" or self._incoming_sock is not None or self.run_state != "inmigrate":
            raise QmpError("The incoming migration has already been started or -incoming defer was not used")
        self._listen(args["uri"])
        return {}

    def _listen(self, uri: str) -> None:
        kind, _s, rest = uri.partition(":")
        host, _s2, port = rest.rpartition(":")
        if kind != "tcp" or not port.isdigit():
            raise QmpError(f"Invalid incoming URI '{uri[:256]}': expected tcp:HOST:PORT")
        ls = socket.create_server((host.strip("[]"), int(port)))
        self._incoming_sock = ls
        self.incoming_address = ls.getsockname()[:2]
        threading.Thread(target=self._receive, args=(ls,), name="ramdiscard-incoming", daemon=True).start()

    def _receive(self, ls: socket.socket) -> None:
        m = self.machine
        with m.lock:
            devices = list(m.devices.values())
            space = m.space
        ok = is_postcopy = False
        try:
            with ls:
                conn, _peer = ls.accept()
                with conn:
                    self.set_status("active")
                    conn.settimeout(self.migrate_timeout)
                    head = conn.recv(len(MAIN_PREAMBLE), socket.MSG_WAITALL)
                    if head == MAIN_PREAMBLE:
                        is_postcopy = postcopy.receive(self, conn, ls)
                    else:
                        serve_live(
                            conn, space, devices, read_timeout=self.migrate_timeout, prefix=head,
                            on_round=self.pass_event,
                        )  # fmt: skip
            ok = True
        except (OSError, migration.MigrationError) as exc:
            self.error = str(exc)
        self.set_status("completed" if ok else "failed")
        if not ok or is_postcopy:
            return
        resume = getattr(m, "resume_incoming", None)
        if callable(resume):
            resume()
        if self.start_paused:
            GuestOfMachine(m).pause()
            self.run_state = "paused"
        else:
            self.run_state = "running"

    # -- digest ---------------------------------------------------------------------------

    def memory_digest(self) -> dict[str, Any]:
        writer = getattr(self.machine, "writer", None)
        if self.run_state == "running" and writer is not None and writer.running and not writer.paused:
            raise QmpError("the guest is running; stop it first (its memory changes meanwhile)")
        with self.machine.lock:
            return memory_digest(self.machine.space, list(self.machine.devices.values()))

    def close(self, wait: float = 30.0) -> None:
        if self._incoming_sock is not None:
            with contextlib.suppress(OSError):
                self._incoming_sock.shutdown(socket.SHUT_RDWR)  # wakes the accept
        super().close(wait)
        t = self._live_thread
        if t is not None:
            t.join(wait)
