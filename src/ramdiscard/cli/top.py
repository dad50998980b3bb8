"""``ramdiscard top --qmp ADDRESS``: a live view of a VM's virtio-mem devices over QMP.

Works with anything that speaks QMP: ``ramdiscard serve`` and QEMU itself. What it shows:

* every virtio-mem device of ``query-memory-devices``: address, block size, requested
  size, plugged size, maximum size; the usable region where the server tells it
  (``x-ramdiscard-status``; QEMU's QMP does not expose it, shown as "-");
* ``MEMORY_DEVICE_SIZE_CHANGE`` events as they arrive (the most recent ones);
* where the server offers ``x-ramdiscard-status`` (found with ``query-commands``; a
  CommandNotFound later just turns the extras off): pinned bytes, DMA mappings,
  memslots, RSS/VmPin, migration progress.

The view is redrawn every ``--interval`` seconds and when an event arrives. ``q`` (with
a terminal on stdin), Ctrl-C or SIGTERM end it cleanly: terminal restored, QMP
connection closed, exit status 0. ``--once`` prints one snapshot (``--json``: as JSON,
the :meth:`Snapshot.to_json` layout) and exits. A server that cannot be reached or
closes the connection ends the command with a one-line error (status 1).

The snapshot logic (:class:`Monitor`) is separate from the terminal (:func:`render`),
so both are tested on their own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ramdiscard.qmp.server import parse_address
from ramdiscard.units import format_size

if TYPE_CHECKING:
    from qemu.qmp import QMPClient
    from rich.console import RenderableType

EVENT = "MEMORY_DEVICE_SIZE_CHANGE"
STATUS_COMMAND = "x-ramdiscard-status"
CONNECT_TIMEOUT = 10.0
KEPT_EVENTS = 12
"""Size-change events kept for display (the newest)."""


def build_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qmp", required=True, metavar="ADDRESS",
        help="the QMP server: unix:PATH or tcp:HOST:PORT (ramdiscard serve, QEMU -qmp)",
    )  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                   help="refresh period (default 1)")  # fmt: skip
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true", help="with --once: the snapshot as JSON")


def client_address(text: str) -> str | tuple[str, int]:
    """``unix:PATH`` / ``tcp:HOST:PORT`` as qemu.qmp's ``connect`` takes it (ValueError)."""
    addr = parse_address(text)
    if addr.kind == "unix":
        assert addr.path is not None
        return addr.path
    assert addr.host is not None and addr.port is not None
    return (addr.host, addr.port)


@dataclass(frozen=True, slots=True)
class SizeChange:
    id: str | None
    size: int
    qom_path: str | None
    timestamp: float
    """The server's timestamp of the event (seconds since the epoch)."""


@dataclass
class Snapshot:
    server: str
    devices: list[dict[str, Any]]
    extensions: bool
    status: dict[str, Any] | None
    events: list[SizeChange] = field(default_factory=list)
    taken: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """``{"server", "taken", "extensions", "devices": [{"id", "memaddr", "block-size",
        "requested-size", "size", "max-size", "usable-region-size" (None if not known),
        "node", "memdev"}], "events": [{"id", "size", "qom-path", "timestamp"}],
        "status": x-ramdiscard-status's reply or None}``."""
        return {
            "server": self.server,
            "taken": self.taken,
            "extensions": self.extensions,
            "devices": self.devices,
            "events": [
                {"id": e.id, "size": e.size, "qom-path": e.qom_path, "timestamp": e.timestamp}
                for e in self.events
            ],
            "status": self.status,
        }


class Monitor:
    """Snapshots of one QMP server's virtio-mem devices (``qmp`` connected)."""

    def __init__(self, qmp: QMPClient) -> None:
        from qemu.qmp import EventListener

        self.qmp = qmp
        self.events: deque[SizeChange] = deque(maxlen=KEPT_EVENTS)
        self.has_status = False
        self.listener = EventListener((EVENT,))
        qmp.register_listener(self.listener)

    @property
    def server(self) -> str:
        greeting = self.qmp.greeting
        if greeting is None:
            return "?"
        version: Any = greeting.QMP.version
        q = version.get("qemu", {})
        package = str(version.get("package", "")).strip()
        name = f"QEMU {q.get('major')}.{q.get('minor')}.{q.get('micro')}"
        return f"{name} ({package})" if package else name

    async def _execute(self, command: str) -> Any:
        return await self.qmp.execute(command)

    async def start(self) -> None:
        """Find out whether the server offers the x-ramdiscard status command."""
        commands = await self._execute("query-commands")
        self.has_status = any(c.get("name") == STATUS_COMMAND for c in commands)

    def _record(self, msg: Any) -> None:
        data = msg.get("data", {})
        ts = msg.get("timestamp", {})
        self.events.append(
            SizeChange(
                data.get("id"), int(data.get("size", 0)), data.get("qom-path"),
                int(ts.get("seconds", 0)) + int(ts.get("microseconds", 0)) / 1e6,
            )
        )  # fmt: skip

    def drain_events(self) -> int:
        """Move the events received so far into :attr:`events`; returns how many."""
        pending = self.listener.clear()
        for msg in pending:
            self._record(msg)
        return len(pending)

    async def wait_event(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for an event (recorded in :attr:`events`);
        True if one arrived."""
        try:
            msg = await asyncio.wait_for(self.listener.get(), timeout)
        except TimeoutError:
            return False
        self._record(msg)
        return True

    async def snapshot(self) -> Snapshot:
        from qemu.qmp import ExecuteError

        reply = await self._execute("query-memory-devices")
        status: dict[str, Any] | None = None
        if self.has_status:
            try:
                status = await self._execute(STATUS_COMMAND)
            except ExecuteError as exc:
                if exc.error_class != "CommandNotFound":
                    raise
                self.has_status = False
        usable = {d.get("id"): d.get("usable-region-size") for d in (status or {}).get("devices", [])}
        devices = []
        for entry in reply:
            if entry.get("type") != "virtio-mem":
                continue
            d = entry.get("data", {})
            devices.append({
                "id": d.get("id"),
                "memaddr": d.get("memaddr"),
                "block-size": d.get("block-size"),
                "requested-size": d.get("requested-size"),
                "size": d.get("size"),
                "max-size": d.get("max-size"),
                "usable-region-size": usable.get(d.get("id")),
                "node": d.get("node"),
                "memdev": d.get("memdev"),
            })  # fmt: skip
        self.drain_events()
        return Snapshot(self.server, devices, self.has_status, status, list(self.events), time.time())


def _size(v: Any) -> str:
    return "-" if v is None else format_size(int(v))


def render(snap: Snapshot, address: str) -> RenderableType:
    """The screen for ``snap`` (a rich renderable)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    clock = time.strftime("%H:%M:%S", time.localtime(snap.taken))
    parts: list[RenderableType] = [
        Text.assemble(
            ("ramdiscard top", "bold"), f"  {address}  {snap.server}  {clock}  ", ("q or Ctrl-C quits", "dim")
        ),
    ]
    t = Table(title="virtio-mem devices", title_justify="left")
    for col in ("id", "address", "block size", "requested", "plugged", "usable region", "max size"):
        t.add_column(col, justify="left" if col == "id" else "right")
    for d in snap.devices:
        addr = f"{d['memaddr']:#x}" if d["memaddr"] is not None else "-"
        t.add_row(
            str(d["id"]), addr, _size(d["block-size"]), _size(d["requested-size"]), _size(d["size"]),
            _size(d["usable-region-size"]), _size(d["max-size"]),
        )  # fmt: skip
    if not snap.devices:
        t.add_row("(none)", "", "", "", "", "", "")
    parts.append(t)
    st = snap.status
    if st is not None:
        x = Table(title="x-ramdiscard-status", title_justify="left", show_header=True)
        for col in ("pinned", "DMA mappings", "memslots", "RSS", "VmPin", "stale pinned", "migration"):
            x.add_column(col, justify="right")
        mig = st.get("migration") or {}
        mig_text = str(mig.get("status", "-"))
        if mig.get("status") in ("active", "completed") and mig.get("total"):
            mig_text += f" {mig.get('transferred', 0) / mig['total']:.0%} of {_size(mig['total'])}"
        kvm = st.get("memslots")
        devs = st.get("devices", [])
        slots = (
            f"{sum(int(d.get('mapped-memslots') or 0) for d in devs)} of "
            f"{sum(int(d.get('memslots') or 0) for d in devs)} mapped"
            + (f", KVM {kvm}" if kvm is not None else "")
        )
        x.add_row(
            _size(st.get("pinned")), str(st.get("dma-mappings", "-")),
            slots,
            _size(st.get("rss")), _size(st.get("vm-pin")), _size(st.get("stale-pinned")), mig_text,
        )  # fmt: skip
        parts.append(x)
    else:
        missing = (
            f"{STATUS_COMMAND} not offered by this server: no pinned bytes, DMA mappings, memslots or "
            "migration progress (QEMU's QMP has no such command)"
        )
        parts.append(Text(missing, style="dim"))
    ev = Table(title=f"{EVENT} (newest last)", title_justify="left")
    for col in ("time", "device", "size"):
        ev.add_column(col, justify="right" if col == "size" else "left")
    for e in snap.events:
        ms = f"{e.timestamp % 1:.3f}"[1:]
        ev.add_row(time.strftime("%H:%M:%S", time.localtime(e.timestamp)) + ms, str(e.id), _size(e.size))
    if not snap.events:
        ev.add_row("(none yet)", "", "")
    parts.append(ev)
    return Group(*parts)


@contextlib.contextmanager
def _keys(fd: int | None) -> Iterator[None]:
    """Single keypresses on ``fd`` (a terminal) without echo, restored on exit."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _session(args: argparse.Namespace, address: str | tuple[str, int]) -> Snapshot | None:
    """Connect; with ``--once`` return one snapshot, else run the live view until quit."""
    from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient, StateError

    qmp = QMPClient("ramdiscard-top")
    try:
        await asyncio.wait_for(qmp.connect(address), CONNECT_TIMEOUT)
    except ConnectError as exc:
        raise ConnectionError(f"--qmp {args.qmp}: cannot connect: {exc.exc}") from None
    except TimeoutError:
        await qmp.disconnect()
        raise ConnectionError(f"--qmp {args.qmp}: no QMP greeting within {CONNECT_TIMEOUT:g} s") from None
    try:
        mon = Monitor(qmp)
        await mon.start()
        if args.once:
            return await mon.snapshot()
        await _live(mon, args)
        return None
    except (EOFError, OSError, ExecInterruptedError, StateError) as exc:
        raise ConnectionError(f"--qmp {args.qmp}: the server closed the connection ({exc!r})") from None
    except ExecuteError as exc:
        raise ValueError(f"--qmp {args.qmp}: {exc}") from None
    finally:
        with contextlib.suppress(Exception):
            await qmp.disconnect()


async def _live(mon: Monitor, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.live import Live

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None

    def on_key() -> None:
        assert fd is not None
        if os.read(fd, 64).lower().find(b"q") >= 0:
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        with _keys(fd):
            if fd is not None:
                loop.add_reader(fd, on_key)
            console = Console()
            with Live(render(await mon.snapshot(), args.qmp), console=console, screen=True,
                      auto_refresh=False) as live:  # fmt: skip
                while not stop.is_set():
                    waiter = asyncio.ensure_future(stop.wait())
                    await asyncio.wait(
                        [waiter, asyncio.ensure_future(mon.wait_event(args.interval))],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    waiter.cancel()
                    if stop.is_set():
                        break
                    live.update(render(await mon.snapshot(), args.qmp), refresh=True)
    finally:
        if fd is not None:
            loop.remove_reader(fd)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(args: argparse.Namespace) -> int:
    """``ramdiscard top`` (see the module docstring)."""
    if args.json and not args.once:
        raise ValueError("--json needs --once (the live view is for a terminal)")
    if not args.interval > 0:
        raise ValueError(f"--interval must be positive, got {args.interval:g}")
    address = client_address(args.qmp)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        snap = asyncio.run(_session(args, address))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if snap is not None:
        if args.json:
            print(json.dumps(snap.to_json(), indent=2))
        else:
            from rich.console import Console

            Console().print(render(snap, args.qmp))
    return 0
