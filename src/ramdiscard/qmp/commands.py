"""QMP command dispatch against a small backend (no I/O of its own).

Rules:

* Commands and their argument checks follow QEMU: a missing argument is "Parameter 'X'
  is missing", an unknown one "Parameter 'X' is unexpected", a wrong JSON type "Invalid
  parameter type for 'X', expected: T"; all GenericError. Command names are QEMU's
  (``query-version``, ``query-commands``, ``query-status``, ``qom-list``, ``qom-get``,
  ``qom-set``, ``query-memory-devices``, ``migrate_cancel``, ``quit``); project commands carry the
  ``x-ramdiscard-`` prefix. ``qmp_capabilities`` is the protocol's (see protocol.py) but
  is listed by ``query-commands``.
* The QOM tree is QEMU's shape: ``/machine/peripheral/<id>`` is a ``virtio-mem-pci``
  device, ``/objects/<memdev>`` its memory backend. Paths resolve as
  object_resolve_path does: absolute paths walk from ``/`` (empty parts skipped, ``..``
  goes up); a partial path such as ``vm0`` or ``peripheral/vm0`` names the unique object
  it ends at. No match, or several, is DeviceNotFound "Device 'P' not found" (qom-list
  says "Path 'P' is ambiguous" for several).
* ``qom-set requested-size`` is checked exactly as virtio-mem's setter checks it, with
  QEMU's messages, *before* the backend is called, so a refused value changes nothing:
  the value must be a JSON integer (negative ones wrap to uint64 as QEMU's input visitor
  does), a multiple of ``block-size`` and at most the backend size.
* Any exception from the backend becomes a GenericError reply; none escapes
  :meth:`CommandDispatcher.execute` except :class:`~ramdiscard.qmp.protocol.QmpError`
  itself, which is what the caller turns into the reply.

* ``migrate_cancel`` (QEMU's name and reply, ``{}``) calls the backend's optional
  ``migrate_cancel()``; without a running migration, or without that method, it does
  nothing and succeeds, as in QEMU.

Theory of operation: :class:`CommandDispatcher` is synchronous and holds no state but the
backend. The server runs every :meth:`CommandDispatcher.execute` call on one worker
thread, so the backend sees one command at a time and never runs on the event loop;
except the commands in :attr:`CommandDispatcher.background` (a migration, which can last
as long as the peer lets it), which run on a thread of their own, concurrently with
the worker's commands.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

from ramdiscard.errors import RamDiscardError
from ramdiscard.qmp.protocol import ErrorClass, QmpError

log = logging.getLogger("ramdiscard.qmp")

U64_MAX: Final = (1 << 64) - 1
DEVICE_TYPE: Final = "virtio-mem-pci"
BACKEND_TYPE: Final = "memory-backend-ram"
PERIPHERAL: Final = "/machine/peripheral"
OBJECTS: Final = "/objects"

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


# -- argument checking -----------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "string" | "boolean" | "any"
    required: bool = True


_PY_TYPES: Final[dict[str, type | tuple[type, ...]]] = {"string": str, "boolean": bool}


def check_arguments(arguments: dict[str, Any], params: tuple[Param, ...]) -> None:
    """QEMU's marshaller checks: missing, wrongly typed, then unexpected members."""
    known = {p.name for p in params}
    for p in params:
        if p.name not in arguments:
            if p.required:
                raise QmpError(f"Parameter '{p.name}' is missing")
            continue
        if p.kind != "any" and not isinstance(arguments[p.name], _PY_TYPES[p.kind]):
            raise QmpError(f"Invalid parameter type for '{p.name}', expected: {p.kind}")
    for key in arguments:
        if key not in known:
            raise QmpError(f"Parameter '{key}' is unexpected")


# -- the QOM tree ------------------------------------------------------------------------------


@dataclass
class QomProperty:
    type: str
    get: Callable[[], Any]
    set: Callable[[Any], None] | None = None


@dataclass(eq=False)
class QomNode:
    """One object of the QOM tree: its type name, properties and children."""

    name: str
    typename: str
    parent: QomNode | None = None
    props: dict[str, QomProperty] = field(default_factory=dict)
    children: dict[str, QomNode] = field(default_factory=dict)

    def add_child(self, name: str, typename: str) -> QomNode:
        child = QomNode(name, typename, parent=self)
        self.children[name] = child
        return child

    @property
    def path(self) -> str:
        parts: list[str] = []
        node: QomNode | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    def walk(self) -> list[QomNode]:
        out = [self]
        for child in self.children.values():
            out.extend(child.walk())
        return out

    def list_properties(self) -> list[dict[str, str]]:
        out = [{"name": "type", "type": "string"}]
        out += [{"name": name, "type": prop.type} for name, prop in self.props.items()]
        out += [{"name": name, "type": f"child<{c.typename}>"} for name, c in self.children.items()]
        return out

    def get(self, prop: str) -> Any:
        if prop == "type":
            return self.typename
        if prop in self.props:
            return self.props[prop].get()
        if prop in self.children:
            return self.children[prop].path
        raise QmpError(f"Property '{self.typename}.{prop}' not found")


def _resolve_from(node: QomNode, parts: list[str]) -> QomNode | None:
    for part in parts:
        if part == "":
            continue
        if part == "..":
            if node.parent is None:
                return None
            node = node.parent
            continue
        child = node.children.get(part)
        if child is None:
            return None
        node = child
    return node


def resolve_path(root: QomNode, path: str) -> tuple[QomNode | None, bool]:
    """(object, ambiguous) for ``path``, as QEMU's object_resolve_path."""
    parts = path.split("/")
    if path.startswith("/"):
        return _resolve_from(root, parts[1:]), False
    matches: list[QomNode] = []
    for node in root.walk():
        if node is root:
            continue
        found = _resolve_from(node, parts)
        if found is not None and all(found is not m for m in matches):
            matches.append(found)
    if len(matches) == 1:
        return matches[0], False
    return None, len(matches) > 1


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


# -- the dispatcher ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A command's result; ``quit`` asks the server to shut down after replying."""

    value: Any
    quit: bool = False


Handler = Callable[[dict[str, Any]], Outcome]


class CommandDispatcher:
    """Runs commands against ``backend``; ``version`` is the ``query-version`` answer."""

    background: Final = frozenset({"x-ramdiscard-migrate"})
    """Commands the server runs off its worker thread (module notes)."""

    def __init__(self, backend: QmpBackend, version: dict[str, Any]) -> None:
        self._backend = backend
        self._version = version
        self._commands: dict[str, tuple[Handler, tuple[Param, ...]]] = {
            "query-version": (self._query_version, ()),
            "query-commands": (self._query_commands, ()),
            "query-status": (self._query_status, ()),
            "qom-list": (self._qom_list, (Param("path", "string"),)),
            "qom-get": (self._qom_get, (Param("path", "string"), Param("property", "string"))),
            "qom-set": (
                self._qom_set,
                (Param("path", "string"), Param("property", "string"), Param("value", "any")),
            ),
            "query-memory-devices": (self._query_memory_devices, ()),
            "migrate_cancel": (self._migrate_cancel, ()),
            "quit": (self._quit, ()),
            "x-ramdiscard-status": (self._x_status, ()),
            "x-ramdiscard-migrate": (self._x_migrate, (Param("uri", "string"),)),
            "x-ramdiscard-dump": (self._x_dump, (Param("path", "string"),)),
        }
        extra = getattr(backend, "extra_commands", None)
        if callable(extra):  # a backend's own commands (live migration) win over the defaults
            self._commands.update(extra())

    def command_names(self) -> list[str]:
        return ["qmp_capabilities", *self._commands]

    def execute(self, name: str, arguments: dict[str, Any]) -> Outcome:
        """Run one command. Raises QmpError (the error reply) and nothing else."""
        entry = self._commands.get(name)
        if entry is None:
            raise QmpError(f"The command {name} has not been found", ErrorClass.CommandNotFound)
        handler, params = entry
        check_arguments(arguments, params)
        try:
            return handler(arguments)
        except QmpError:
            raise
        except (RamDiscardError, ValueError, OSError) as exc:
            raise QmpError(str(exc)) from exc
        except Exception as exc:
            log.exception("QMP command %s failed", name)
            raise QmpError(f"internal error in {name}: {type(exc).__name__}: {exc}") from exc

    # -- QOM ---------------------------------------------------------------------------

    def qom_tree(self) -> QomNode:
        """The current QOM tree, built from the backend's devices."""
        root = QomNode("", "container")
        machine = root.add_child("machine", "ramdiscard-machine")
        peripheral = machine.add_child("peripheral", "container")
        objects = root.add_child("objects", "container")
        for dev in self._backend.memory_devices():
            node = peripheral.add_child(dev.id, DEVICE_TYPE)
            self._device_props(node, dev)
            mem = objects.add_child(dev.memdev, BACKEND_TYPE)
            mem.props["size"] = QomProperty("uint64", _constant(dev.max_size))
        return root

    def _device_props(self, node: QomNode, dev: MemoryDeviceInfo) -> None:
        def realized(name: str) -> Callable[[Any], None]:
            def refuse(_value: Any) -> None:
                raise QmpError(
                    f"Attempt to set property '{name}' on device '{dev.id}' "
                    f"(type '{DEVICE_TYPE}') after it was realized"
                )

            return refuse

        def not_writable(_value: Any) -> None:
            raise QmpError(f"Property '{DEVICE_TYPE}.size' is not writable")

        def block_size_fixed(_value: Any) -> None:
            raise QmpError("'block-size' cannot be changed")

        node.props.update(
            {
                "memaddr": QomProperty("uint64", lambda: dev.memaddr, realized("memaddr")),
                "node": QomProperty("uint32", lambda: dev.node, realized("node")),
                "memdev": QomProperty(
                    "link<memory-backend>", lambda: f"{OBJECTS}/{dev.memdev}", realized("memdev")
                ),
                "size": QomProperty("size", lambda: dev.size, not_writable),
                "requested-size": QomProperty(
                    "size", lambda: dev.requested_size, lambda v: self._set_requested_size(dev, v)
                ),
                "block-size": QomProperty("size", lambda: dev.block_size, block_size_fixed),
            }
        )

    def _set_requested_size(self, dev: MemoryDeviceInfo, value: Any) -> None:
        name = "requested-size"
        if isinstance(value, bool) or not isinstance(value, int) or not -(1 << 63) <= value <= U64_MAX:
            raise QmpError(f"Parameter '{name}' expects uint64")
        value &= U64_MAX
        if value % dev.block_size:
            raise QmpError(f"'{name}' has to be multiples of 'block-size' (0x{dev.block_size:x})")
        if value > dev.max_size:
            # QEMU's text, missing space included, so scripts matching it keep working.
            raise QmpError(f"'{name}' cannot exceed the memory backend size(0x{dev.max_size:x})")
        self._backend.set_requested_size(dev.id, value)

    def _resolve(self, path: str) -> QomNode:
        node, _ambiguous = resolve_path(self.qom_tree(), path)
        if node is None:
            raise QmpError(f"Device '{path}' not found", ErrorClass.DeviceNotFound)
        return node

    def _qom_list(self, args: dict[str, Any]) -> Outcome:
        path = args["path"]
        node, ambiguous = resolve_path(self.qom_tree(), path)
        if node is None:
            if ambiguous:
                raise QmpError(f"Path '{path}' is ambiguous")
            raise QmpError(f"Device '{path}' not found", ErrorClass.DeviceNotFound)
        return Outcome(node.list_properties())

    def _qom_get(self, args: dict[str, Any]) -> Outcome:
        return Outcome(self._resolve(args["path"]).get(args["property"]))

    def _qom_set(self, args: dict[str, Any]) -> Outcome:
        node = self._resolve(args["path"])
        prop = args["property"]
        if prop == "type" or prop in node.children:
            raise QmpError(f"Property '{node.typename}.{prop}' is not writable")
        spec = node.props.get(prop)
        if spec is None:
            raise QmpError(f"Property '{node.typename}.{prop}' not found")
        if spec.set is None:
            raise QmpError(f"Property '{node.typename}.{prop}' is not writable")
        spec.set(args["value"])
        return Outcome({})

    # -- queries -------------------------------------------------------------------------

    def _query_version(self, _args: dict[str, Any]) -> Outcome:
        return Outcome(self._version)

    def _query_commands(self, _args: dict[str, Any]) -> Outcome:
        return Outcome([{"name": n} for n in self.command_names()])

    def _query_status(self, _args: dict[str, Any]) -> Outcome:
        return Outcome({"status": "running", "running": True})

    def _query_memory_devices(self, _args: dict[str, Any]) -> Outcome:
        return Outcome([dev.to_json() for dev in self._backend.memory_devices()])

    def _migrate_cancel(self, _args: dict[str, Any]) -> Outcome:
        cancel = getattr(self._backend, "migrate_cancel", None)
        if callable(cancel):
            cancel()
        return Outcome({})

    def _quit(self, _args: dict[str, Any]) -> Outcome:
        return Outcome({}, quit=True)

    # -- project commands ----------------------------------------------------------------

    def _x_status(self, _args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.status())

    def _x_migrate(self, args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.migrate(args["uri"]))

    def _x_dump(self, args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.dump(args["path"]))
