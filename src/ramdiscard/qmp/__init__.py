"""QMP control plane: drive a running ramdiscard machine with QEMU's own tooling.

* :mod:`~ramdiscard.qmp.protocol`: framing, parsing, negotiation (sans-I/O).
* :mod:`~ramdiscard.qmp.commands`: command dispatch and the QOM tree over a
  :class:`QmpBackend`.
* :mod:`~ramdiscard.qmp.events`: events and QEMU's per-device rate limiting.
* :mod:`~ramdiscard.qmp.server`: the asyncio server (unix/tcp, several clients).
* :mod:`~ramdiscard.qmp.machine_backend`: the backend of a scenario machine.

:func:`serve` runs a server until ``quit`` (or SIGINT/SIGTERM); the command line
``ramdiscard serve SCENARIO.toml --qmp unix:PATH`` is :mod:`ramdiscard.cli.serve`. See
``docs/qmp.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

from ramdiscard.migration.transport import IO_TIMEOUT
from ramdiscard.qmp.backend import MemoryDeviceInfo, QmpBackend
from ramdiscard.qmp.commands import CommandDispatcher
from ramdiscard.qmp.events import EventThrottle, QmpEvent, size_change_event
from ramdiscard.qmp.machine_backend import MachineBackend
from ramdiscard.qmp.protocol import ErrorClass, JsonFramer, QmpConnection, QmpError
from ramdiscard.qmp.server import Address, QmpServer, parse_address, version_info

__all__ = [
    "Address",
    "CommandDispatcher",
    "ErrorClass",
    "EventThrottle",
    "JsonFramer",
    "MachineBackend",
    "MemoryDeviceInfo",
    "QmpBackend",
    "QmpConnection",
    "QmpError",
    "QmpEvent",
    "QmpServer",
    "parse_address",
    "serve",
    "serve_async",
    "size_change_event",
    "version_info",
]


def as_backend(target: Any, *, migrate_timeout: float = IO_TIMEOUT) -> QmpBackend:
    """``target`` itself if it is a QmpBackend, else a MachineBackend around it."""
    if isinstance(target, QmpBackend):
        return target
    return MachineBackend(target, migrate_timeout=migrate_timeout)


async def serve_async(
    target: Any,
    address: str | Address,
    *,
    on_ready: Callable[[QmpServer], None] | None = None,
    handle_signals: bool = False,
) -> bool:
    """Serve ``target`` (a QmpBackend or a Machine) until ``quit`` or a signal; the
    backend is closed on the way out. ``on_ready`` gets the started server. Returns
    True when SIGINT/SIGTERM (with ``handle_signals``) stopped it."""
    server = QmpServer(as_backend(target), address)
    await server.start()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    signalled: list[asyncio.Task[None]] = []

    def stop() -> None:
        signalled.append(asyncio.ensure_future(server.close()))

    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop)
                installed.append(sig)
    try:
        if on_ready is not None:
            on_ready(server)
        await server.wait_closed()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await server.close()
    return bool(signalled)


def serve(target: Any, address: str | Address, *, migrate_timeout: float = IO_TIMEOUT) -> int:
    """Serve QMP for ``target`` on ``address`` until ``quit`` (or SIGINT/SIGTERM).

    A machine (anything that is not already a QmpBackend) has its background guest
    started first; ``migrate_timeout`` bounds how long its TCP migration may wait for a
    destination that does not read. Returns 0 after ``quit``, 130 after SIGINT/SIGTERM
    (everything released either way); raises OSError when the address cannot be bound
    (the machine is closed then too).
    """
    backend = as_backend(target, migrate_timeout=migrate_timeout)
    start = getattr(target, "start", None)
    try:
        if not isinstance(target, QmpBackend) and callable(start):
            start()
        addr = parse_address(address) if isinstance(address, str) else address
    except BaseException:
        backend.close()
        raise

    def ready(server: QmpServer) -> None:
        print(f"ramdiscard: QMP listening on {server.address}", file=sys.stderr, flush=True)

    try:
        signalled = asyncio.run(serve_async(backend, addr, on_ready=ready, handle_signals=True))
    finally:
        backend.close()
    return 130 if signalled else 0
