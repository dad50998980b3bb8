"""The QmpBackend of a scenario :class:`~ramdiscard.machine.Machine`.

Rules:

* Every call takes the machine's lock, so a command sees (and changes) a consistent
  machine while the background guest thread plugs; the guest thread's size-change
  notifications are forwarded as they come (from that thread).
* ``x-ramdiscard-migrate`` uses :mod:`ramdiscard.migration` and ``x-ramdiscard-dump``
  :mod:`ramdiscard.dump`. ``migrate`` accepts ``file:PATH`` (a snapshot file) and
  ``tcp:HOST:PORT`` (a destination running ``ramdiscard migrate receive --scenario`` with
  the same scenario).
* A migration does not hold the machine lock: the devices are frozen (the guest's plugs
  answer BUSY) and it runs on the caller's thread while other commands go on. One at a
  time ("There's a migration process in progress" otherwise). A TCP migration fails
  after ``migrate_timeout`` seconds in which the destination read nothing;
  :meth:`MachineBackend.migrate_cancel` (QMP ``migrate_cancel``) shuts its socket down so
  it fails at once. :meth:`MachineBackend.close` cancels a running migration and waits
  for it to end before the machine is closed.
* ``status`` is :meth:`Machine.status` made JSON-safe, with QMP-style kebab-case keys and
  the per-device table as a list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import socket
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ramdiscard import migration
from ramdiscard.dump import dump_guest_memory
from ramdiscard.fileio import create_output
from ramdiscard.migration.transport import IO_TIMEOUT
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.qmp.backend import MemoryBackendInfo, MemoryDeviceInfo, SizeChangeFn
from ramdiscard.qmp.protocol import ErrorClass, QmpError


class MachineLike(Protocol):
    """The part of :class:`ramdiscard.machine.Machine` the adapter uses."""

    lock: threading.RLock
    devices: dict[str, VirtioMem]

    @property
    def space(self) -> Any: ...

    def set_requested_size(self, dev_id: str, size: int) -> None: ...

    def status(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON types, dict keys in kebab-case."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k).replace("_", "-"): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


_BACKEND_TYPES = {
    "anonymous": "memory-backend-ram",
    "memfd": "memory-backend-memfd",
    "file": "memory-backend-file",
}


def _backend_info(name: str, block: Any, *, prealloc: bool) -> MemoryBackendInfo:
    backing = str(getattr(block, "backing", "anonymous"))
    return MemoryBackendInfo(
        id=name,
        typename=_BACKEND_TYPES.get(backing, "memory-backend-ram"),
        size=int(block.size),
        prealloc=prealloc,
        share=backing != "anonymous",
        mem_path=getattr(block, "path", None) if backing == "file" else None,
    )


class MachineBackend:
    """Adapts a running machine to :class:`~ramdiscard.qmp.commands.QmpBackend`."""

    def __init__(self, machine: MachineLike, *, migrate_timeout: float = IO_TIMEOUT) -> None:
        self.machine = machine
        self.migrate_timeout = migrate_timeout
        self._state = threading.Lock()
        self._migrating = False
        self._idle = threading.Condition(self._state)
        self._sock: socket.socket | None = None
        self._cancelled = False
        self._closed = False
        self._migration: dict[str, Any] = {"status": "none"}

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        with self.machine.lock:
            return [
                MemoryDeviceInfo(
                    id=dev_id,
                    memaddr=d.addr,
                    requested_size=d.requested_size,
                    size=d.plugged_size,
                    max_size=d.region_size,
                    block_size=d.block_size,
                    memdev=d.region.name,
                    node=d.node,
                    prealloc=d.prealloc,
                    dynamic_memslots=d.dynamic_memslots,
                    unplugged_inaccessible=d.unplugged_inaccessible,
                )
                for dev_id, d in self.machine.devices.items()
            ]

    def memory_backends(self) -> list[MemoryBackendInfo]:
        """Boot RAM (``pc.ram``, as QEMU names it) then each device's memdev; the type
        follows the backing (anonymous: -ram, memfd: -memfd, file: -file)."""
        with self.machine.lock:
            out: list[MemoryBackendInfo] = []
            boot = getattr(self.machine, "boot", None)
            if boot is not None and boot.ram is not None:
                out.append(_backend_info(boot.name, boot.ram, prealloc=False))
            for d in self.machine.devices.values():
                block = d.region.ram
                if block is not None:
                    out.append(_backend_info(d.region.name, block, prealloc=d.prealloc))
            return out

    def base_memory(self) -> int:
        boot = getattr(self.machine, "boot", None)
        return int(boot.size) if boot is not None else 0

    def system_reset(self) -> None:
        reset = getattr(self.machine, "system_reset", None)
        if callable(reset):
            reset()
        else:
            with self.machine.lock:
                for d in self.machine.devices.values():
                    d.system_reset()

    def pause(self) -> None:
        """``stop``: the guest thread stops (its vCPUs, so to say)."""
        stop = getattr(self.machine, "stop", None)
        if callable(stop):
            stop()

    def resume(self) -> None:
        start = getattr(self.machine, "start", None)
        if callable(start):
            start()

    def set_requested_size(self, device_id: str, size: int) -> None:
        try:
            self.machine.set_requested_size(device_id, size)
        except KeyError as exc:
            raise QmpError(f"Device '{device_id}' not found", ErrorClass.DeviceNotFound) from exc

    def status(self) -> dict[str, Any]:
        raw = dict(self.machine.status())
        devices = raw.pop("devices", {})
        out: dict[str, Any] = jsonable(raw)
        out["devices"] = [{"id": dev_id, **jsonable(info)} for dev_id, info in devices.items()]
        with self._state:
            out["migration"] = dict(self._migration)
        return out

    def _on_progress(self, p: migration.Progress) -> None:
        with self._state:
            self._migration.update(transferred=p.bytes_done, total=p.bytes_total)

    def migrate(self, uri: str) -> dict[str, Any]:
        kind, _sep, rest = uri.partition(":")
        tcp = kind == "tcp" and rest.rpartition(":")[2].isdigit()
        if not tcp and not (kind == "file" and rest):
            raise QmpError(f"Invalid migration URI '{uri[:256]}': expected file:PATH or tcp:HOST:PORT")
        with self._state:
            if self._closed:
                raise QmpError("the machine is shutting down")
            if self._migrating:
                raise QmpError("There's a migration process in progress")
            self._migrating, self._cancelled = True, False
            self._migration = {"status": "active", "uri": uri[:256], "transferred": 0, "total": 0}
        ok = False
        try:
            with self.machine.lock:
                devices = list(self.machine.devices.values())
                space = self.machine.space
            if tcp:
                host, _s, port = rest.rpartition(":")
                stats = migration.migrate_to(
                    host.strip("[]"),
                    int(port),
                    space,
                    devices,
                    timeout=self.migrate_timeout,
                    io_timeout=self.migrate_timeout,
                    on_socket=self._adopt_socket,
                    progress=self._on_progress,
                )
            else:
                with create_output(rest, "migration file") as f:
                    stats = migration.save(space, devices, f, progress=self._on_progress)
            ok = True
        except (OSError, migration.MigrationError) as exc:
            if self._cancelled:
                raise QmpError("migration cancelled (migrate_cancel)") from exc
            raise
        finally:
            with self._state:
                self._migrating, self._sock = False, None
                self._migration["status"] = "completed" if ok else "failed"
                self._idle.notify_all()
        result: dict[str, Any] = jsonable(stats)
        return result

    def _adopt_socket(self, sock: socket.socket) -> None:
        with self._state:
            if self._cancelled:
                raise migration.MigrationError("migration cancelled")
            self._sock = sock

    def migrate_cancel(self) -> None:
        """Cancel the running migration (it fails at once); nothing when none runs."""
        with self._state:
            if not self._migrating:
                return
            self._cancelled = True
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_RDWR)

    def dump(self, path: str) -> dict[str, Any]:
        with self.machine.lock:
            info = dump_guest_memory(self.machine.space, path)
        result: dict[str, Any] = jsonable(info)
        return result

    def add_size_change_listener(self, fn: SizeChangeFn) -> Callable[[], None]:
        with self.machine.lock:
            devices = list(self.machine.devices.values())
            for d in devices:
                d.add_size_change_notifier(fn)

        def unsubscribe() -> None:
            with self.machine.lock:
                for d in devices:
                    with contextlib.suppress(ValueError):
                        d.remove_size_change_notifier(fn)

        return unsubscribe

    def close(self, wait: float = 30.0) -> None:
        """Cancel a running migration, wait for it (at most ``wait`` s), close the machine."""
        with self._state:
            self._closed = True
        self.migrate_cancel()
        with self._state:
            self._idle.wait_for(lambda: not self._migrating, wait)
        self.machine.close()
