"""What the QMP commands run against: the backend interface, the records it answers with,
and the argument checks every command shares (no I/O).

Rules:

* A :class:`QmpBackend` is the machine side of QMP: its memory devices, requested-size
  changes, status, migration, dumps, size-change subscriptions and close. Optional
  methods are listed by :class:`VmControl` and looked up with ``getattr``.
* :func:`check_arguments` is QEMU's marshaller: missing, wrongly typed, then unexpected
  members, each a GenericError with QEMU's text.
* A command handler returns an :class:`Outcome`; events it raises go to an ``EmitFn``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

from ramdiscard.qmp.events import QmpEvent
from ramdiscard.qmp.protocol import QmpError
from ramdiscard.qmp.qom import OBJECTS, PERIPHERAL

SizeChangeFn = Callable[[str, int], None]
"""Called with (device id, new plugged size) from whatever thread plugged."""


@dataclass(frozen=True)
class MemoryDeviceInfo:
    """A virtio-mem device as ``query-memory-devices`` reports it (sizes in bytes)."""

    id: str
    memaddr: int
    requested_size: int
    size: int
    max_size: int
    block_size: int
    memdev: str
    node: int = 0
    prealloc: bool = False
    dynamic_memslots: bool = False
    unplugged_inaccessible: bool = True

    @property
    def qom_path(self) -> str:
        return f"{PERIPHERAL}/{self.id}"

    def to_json(self) -> dict[str, Any]:
        return {
            "type": "virtio-mem",
            "data": {
                "id": self.id,
                "memaddr": self.memaddr,
                "requested-size": self.requested_size,
                "size": self.size,
                "max-size": self.max_size,
                "block-size": self.block_size,
                "node": self.node,
                "memdev": f"{OBJECTS}/{self.memdev}",
            },
        }


@dataclass(frozen=True)
class MemoryBackendInfo:
    """A memory backend object (``/objects/<id>``) as query-memdev reports it.
    ``typename`` is memory-backend-ram, -memfd or -file after how the memory is backed."""

    id: str
    typename: str
    size: int
    prealloc: bool = False
    share: bool = False
    mem_path: str | None = None
    container: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "size": self.size,
            "merge": True,
            "dump": True,
            "prealloc": self.prealloc,
            "share": self.share,
            "reserve": True,
            "host-nodes": [],
            "policy": "default",
        }


@runtime_checkable
class QmpBackend(Protocol):
    """What the QMP server needs from a running machine. Called from one thread at a
    time (the server's worker), except :meth:`add_size_change_listener` callbacks, which
    arrive from the thread that plugged."""

    def memory_devices(self) -> list[MemoryDeviceInfo]: ...

    def set_requested_size(self, device_id: str, size: int) -> None:
        """Ask the guest for ``size`` bytes; raises ValueError (nothing changed) if refused."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON-ready project status (pinned bytes, mappings, RSS, per device sizes)."""
        ...

    def migrate(self, uri: str) -> dict[str, Any]:
        """Save the machine to ``uri``; raises QmpError when unsupported. May run on a
        thread of its own, concurrently with the other calls (see the module notes); a
        backend may offer ``migrate_cancel()`` to end it early."""
        ...

    def dump(self, path: str) -> dict[str, Any]:
        """Write a guest memory dump to ``path``; raises QmpError when unsupported."""
        ...

    def add_size_change_listener(self, fn: SizeChangeFn) -> Callable[[], None]:
        """Subscribe to plugged-size changes; returns the unsubscribe function."""
        ...

    def close(self) -> None:
        """Stop the machine and release everything it holds. Idempotent."""
        ...


class VmControl(Protocol):
    """Optional backend methods (looked up with getattr; absent ones are skipped):

    * ``memory_backends() -> list[MemoryBackendInfo]``: every RAM backend, boot RAM first
      (without it, one memory-backend-ram per device memdev).
    * ``base_memory() -> int``: boot RAM bytes (query-memory-size-summary).
    * ``system_reset()``: every device unplugs everything, the guest reboots.
    * ``pause()`` / ``resume()``: stop and restart the guest (``stop``/``cont``).
    """


# -- argument checking -----------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "string" | "boolean" | "int" | "any"
    required: bool = True


_PY_TYPES: Final[dict[str, type | tuple[type, ...]]] = {"string": str, "boolean": bool, "int": int}
_QAPI_NAMES: Final = {"string": "string", "boolean": "boolean", "int": "integer"}


def check_arguments(arguments: dict[str, Any], params: tuple[Param, ...]) -> None:
    """QEMU's marshaller checks: missing, wrongly typed, then unexpected members."""
    known = {p.name for p in params}
    for p in params:
        if p.name not in arguments:
            if p.required:
                raise QmpError(f"Parameter '{p.name}' is missing")
            continue
        value = arguments[p.name]
        wrong = p.kind != "any" and not isinstance(value, _PY_TYPES[p.kind])
        if wrong or (p.kind == "int" and isinstance(value, bool)):
            raise QmpError(f"Invalid parameter type for '{p.name}', expected: {_QAPI_NAMES[p.kind]}")
    for key in arguments:
        if key not in known:
            raise QmpError(f"Parameter '{key}' is unexpected")


@dataclass(frozen=True)
class Outcome:
    """A command's result; ``quit`` asks the server to shut down after replying."""

    value: Any
    quit: bool = False


Handler = Callable[[dict[str, Any]], Outcome]
EmitFn = Callable[[QmpEvent], None]
