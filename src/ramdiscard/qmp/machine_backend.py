"""The QmpBackend of a scenario :class:`~ramdiscard.machine.Machine`.

Rules:

* Every call takes the machine's lock, so a command sees (and changes) a consistent
  machine while the background guest thread plugs; the guest thread's size-change
  notifications are forwarded as they come (from that thread).
* ``x-ramdiscard-migrate`` uses :mod:`ramdiscard.migration` and ``x-ramdiscard-dump``
  :mod:`ramdiscard.dump`. ``migrate`` accepts ``file:PATH`` (a snapshot file) and
  ``tcp:HOST:PORT`` (a destination running ``ramdiscard migrate receive``).
* ``status`` is :meth:`Machine.status` made JSON-safe, with QMP-style kebab-case keys and
  the per-device table as a list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ramdiscard import migration
from ramdiscard.dump import dump_guest_memory
from ramdiscard.fileio import create_output
from ramdiscard.qmp.commands import MemoryDeviceInfo, SizeChangeFn
from ramdiscard.qmp.protocol import ErrorClass, QmpError
from ramdiscard.virtio_mem import VirtioMem


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


class MachineBackend:
    """Adapts a running machine to :class:`~ramdiscard.qmp.commands.QmpBackend`."""

    def __init__(self, machine: MachineLike) -> None:
        self.machine = machine

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
                )
                for dev_id, d in self.machine.devices.items()
            ]

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
        return out

    def migrate(self, uri: str) -> dict[str, Any]:
        kind, _sep, rest = uri.partition(":")
        with self.machine.lock:
            devices = list(self.machine.devices.values())
            if kind == "file" and rest:
                with create_output(rest, "migration file") as f:
                    stats = migration.save(self.machine.space, devices, f)
            elif kind == "tcp" and rest.rpartition(":")[2].isdigit():
                host, _s, port = rest.rpartition(":")
                stats = migration.migrate_to(host.strip("[]"), int(port), self.machine.space, devices)
            else:
                raise QmpError(f"Invalid migration URI '{uri}': expected file:PATH or tcp:HOST:PORT")
        result: dict[str, Any] = jsonable(stats)
        return result

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

    def close(self) -> None:
        self.machine.close()
