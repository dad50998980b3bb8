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

The backend interface, its records (:class:`MemoryDeviceInfo`, :class:`MemoryBackendInfo`)
and the argument checks live in :mod:`ramdiscard.qmp.backend`; QOM
path resolution in :mod:`ramdiscard.qmp.qom`.

Theory of operation: :class:`CommandDispatcher` is synchronous and holds no state but the
backend. The server runs every :meth:`CommandDispatcher.execute` call on one worker
thread, so the backend sees one command at a time and never runs on the event loop;
except the commands in :attr:`CommandDispatcher.background` (a migration, which can last
as long as the peer lets it), which run on a thread of their own, concurrently with
the worker's commands.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from ramdiscard.errors import RamDiscardError
from ramdiscard.qmp import qom
from ramdiscard.qmp.backend import (
    EmitFn,
    Handler,
    MemoryBackendInfo,
    MemoryDeviceInfo,
    Outcome,
    Param,
    QmpBackend,
    check_arguments,
)
from ramdiscard.qmp.events import dump_completed_event, qmp_event
from ramdiscard.qmp.protocol import ErrorClass, QmpError
from ramdiscard.qmp.qom import DEVICE_TYPE, OBJECTS, PERIPHERAL, QomNode, QomProperty, resolve_path

log = logging.getLogger("ramdiscard.qmp")

U64_MAX: Final = (1 << 64) - 1
BACKEND_TYPE: Final = "memory-backend-ram"

DUMP_FORMATS: Final = ("elf", "kdump-zlib", "kdump-lzo", "kdump-snappy", "kdump-raw-zlib",
                       "kdump-raw-lzo", "kdump-raw-snappy", "win-dmp")  # fmt: skip


class CommandDispatcher:
    """Runs commands against ``backend``; ``version`` is the ``query-version`` answer.

    ``emit`` receives the events a command raises (RESET, STOP, RESUME, SHUTDOWN,
    DUMP_COMPLETED), from the thread that raises them, before the command returns, so a
    server that delivers them in call order sends them ahead of the reply, as QEMU does.
    The run state (``running``; ``paused`` after ``stop``; ``prelaunch`` after a
    ``system_reset`` of a stopped machine, as QEMU) lives here, or in the backend when it
    has a ``run_state`` attribute (a backend that migrates also sets ``inmigrate`` and
    ``postmigrate``); the dump state lives here. ``stop``/``cont`` call the backend's
    ``pause``/``resume`` and raise STOP/RESUME; ``cont`` is refused in ``inmigrate``.
    """

    background: Final = frozenset({"x-ramdiscard-migrate"})
    """Commands the server runs off its worker thread (module notes)."""

    def __init__(self, backend: QmpBackend, version: dict[str, Any], emit: EmitFn | None = None) -> None:
        self._backend = backend
        self._version = version
        self._emit: EmitFn = emit or (lambda _event: None)
        self._own_status = "running"
        self._dump_lock = threading.Lock()
        self._dump: dict[str, Any] = {"status": "none", "completed": 0, "total": 0}
        self._dump_thread: threading.Thread | None = None
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
            "qom-list-properties": (self._qom_list_properties, (Param("typename", "string"),)),
            "device-list-properties": (self._device_list_properties, (Param("typename", "string"),)),
            "query-memory-devices": (self._query_memory_devices, ()),
            "query-memory-size-summary": (self._query_memory_size_summary, ()),
            "query-memdev": (self._query_memdev, ()),
            "system_reset": (self._system_reset, ()),
            "stop": (self._stop, ()),
            "cont": (self._cont, ()),
            "dump-guest-memory": (
                self._dump_guest_memory,
                (
                    Param("paging", "boolean"),
                    Param("protocol", "string"),
                    Param("detach", "boolean", False),
                    Param("begin", "int", False),
                    Param("length", "int", False),
                    Param("format", "string", False),
                ),
            ),
            "query-dump": (self._query_dump, ()),
            "migrate_cancel": (self._migrate_cancel, ()),
            "quit": (self._quit, ()),
            "x-ramdiscard-status": (self._x_status, ()),
            "x-ramdiscard-migrate": (self._x_migrate, (Param("uri", "string"),)),
            "x-ramdiscard-dump": (self._x_dump, (Param("path", "string"),)),
        }
        extra = getattr(backend, "extra_commands", None)
        if callable(extra):  # a backend's own commands (live migration) win over the defaults
            self._commands.update(extra())

    @property
    def _status(self) -> str:
        state = getattr(self._backend, "run_state", None)
        return state if isinstance(state, str) else self._own_status

    @_status.setter
    def _status(self, value: str) -> None:
        if isinstance(getattr(self._backend, "run_state", None), str):
            self._backend.run_state = value  # type: ignore[attr-defined]
        else:
            self._own_status = value

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

    def _memory_backends(self, devices: list[MemoryDeviceInfo]) -> list[MemoryBackendInfo]:
        fn = getattr(self._backend, "memory_backends", None)
        if callable(fn):
            backends: list[MemoryBackendInfo] = fn()
            return backends
        return [MemoryBackendInfo(d.memdev, BACKEND_TYPE, d.max_size) for d in devices]

    def qom_tree(self) -> QomNode:
        """The current QOM tree, built from the backend's devices and memory backends."""
        root = QomNode("", "container")
        machine = root.add_child("machine", "pc-i440fx-10.0-machine")
        peripheral = machine.add_child("peripheral", "container")
        objects = root.add_child("objects", "container")
        devices = self._backend.memory_devices()
        for mem in self._memory_backends(devices):
            node = objects.add_child(mem.id, mem.typename)
            self._backend_props(node, mem)
        for index, dev in enumerate(devices):
            node = peripheral.add_child(dev.id, DEVICE_TYPE)
            self._device_props(node, dev, index)
        return root

    def _backend_props(self, node: QomNode, mem: MemoryBackendInfo) -> None:
        values: dict[str, Callable[[], Any]] = {
            "size": lambda: mem.size,
            "prealloc": lambda: mem.prealloc,
            "share": lambda: mem.share,
        }
        if mem.mem_path is not None:
            path = mem.mem_path
            values["mem-path"] = lambda: path
        recorded = qom.schema()["memory-regions"]
        region = recorded.get(f"/objects/{mem.id}/{mem.id}[0]") or recorded["/objects/{memdev}/{memdev}[0]"]
        qom.populate(
            node,
            mem.typename,
            values,
            texts={"{memdev}": mem.id},
            child=qom.memory_region_child(mem.container or region["container"], mem.size),
        )

    def _device_props(self, node: QomNode, dev: MemoryDeviceInfo, index: int) -> None:
        slot = qom.FIRST_PCI_SLOT + index
        path = f"{PERIPHERAL}/{dev.id}"
        values: dict[str, Callable[[], Any]] = {
            "realized": lambda: True,
            "memaddr": lambda: dev.memaddr,
            "node": lambda: dev.node,
            "memdev": lambda: f"{OBJECTS}/{dev.memdev}",
            "prealloc": lambda: dev.prealloc,
            "dynamic-memslots": lambda: dev.dynamic_memslots,
            "unplugged-inaccessible": lambda: "on" if dev.unplugged_inaccessible else "off",
            "size": lambda: dev.size,
            "requested-size": lambda: dev.requested_size,
            "block-size": lambda: dev.block_size,
            "addr": lambda: slot << 3,
            "legacy-addr": lambda: f"{slot:02x}.0",
        }
        setters = {"requested-size": lambda v: self._set_requested_size(dev, v)}
        texts = {"/machine/peripheral/vm0": path, "{id}": dev.id, "{memdev}": dev.memdev}
        regions = qom.schema()["memory-regions"]

        def child(parent: QomNode, name: str, typename: str, _recorded: Any) -> None:
            node = parent.add_child(name, typename)
            if typename == "virtio-mem":
                qom.populate(node, typename, values, texts=texts, setters=setters)
                node.props["parent_bus"] = QomProperty(
                    "link<bus>", lambda: f"{path}/virtio-bus", node.props["parent_bus"].set
                )
            elif typename == "virtio-pci-bus":
                qom.populate(node, typename, {}, texts=texts)
            elif typename == "memory-region":
                rec = regions.get(f"/machine/peripheral/{{id}}/{name}", {})
                container = str(rec.get("container", "")).replace("/machine/peripheral/vm0", path)
                qom.populate(
                    node,
                    typename,
                    {
                        "container": lambda: container,
                        "addr": lambda: rec.get("addr", 0),
                        "size": lambda: rec.get("size", 0),
                    },
                    texts={},
                )

        qom.populate(node, DEVICE_TYPE, values, texts=texts, setters=setters, child=child)

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
        self._resolve(args["path"]).set(args["property"], args["value"])
        return Outcome({})

    def _qom_list_properties(self, args: dict[str, Any]) -> Outcome:
        props = qom.list_properties(args["typename"])
        if props is None:
            raise QmpError(f"Class '{args['typename']}' not found", ErrorClass.DeviceNotFound)
        return Outcome(props)

    def _device_list_properties(self, args: dict[str, Any]) -> Outcome:
        name = args["typename"]
        props = qom.device_list_properties(name)
        if props is None:
            if name in qom.known_types():
                raise QmpError(f"'{name}' is not a user-creatable device type known to ramdiscard")
            raise QmpError(f"Device '{name}' not found", ErrorClass.DeviceNotFound)
        return Outcome(props)

    # -- queries -------------------------------------------------------------------------

    def _query_version(self, _args: dict[str, Any]) -> Outcome:
        return Outcome(self._version)

    def _query_commands(self, _args: dict[str, Any]) -> Outcome:
        return Outcome([{"name": n} for n in self.command_names()])

    def _query_status(self, _args: dict[str, Any]) -> Outcome:
        return Outcome({"status": self._status, "running": self._status == "running"})

    def _query_memory_devices(self, _args: dict[str, Any]) -> Outcome:
        return Outcome([dev.to_json() for dev in self._backend.memory_devices()])

    def _query_memory_size_summary(self, _args: dict[str, Any]) -> Outcome:
        base = getattr(self._backend, "base_memory", None)
        devices = self._backend.memory_devices()
        return Outcome(
            {
                "base-memory": int(base()) if callable(base) else 0,
                "plugged-memory": sum(d.size for d in devices),
            }
        )

    def _query_memdev(self, _args: dict[str, Any]) -> Outcome:
        return Outcome([m.to_json() for m in self._memory_backends(self._backend.memory_devices())])

    # -- run state -----------------------------------------------------------------------

    def _system_reset(self, _args: dict[str, Any]) -> Outcome:
        reset = getattr(self._backend, "system_reset", None)
        if callable(reset):
            reset()
        if self._status != "running":
            self._status = "prelaunch"  # QEMU: a reset of a stopped VM leaves it in prelaunch
        self._emit(qmp_event("RESET", {"guest": False, "reason": "host-qmp-system-reset"}))
        return Outcome({})

    def _stop(self, _args: dict[str, Any]) -> Outcome:
        if self._status == "running":
            pause = getattr(self._backend, "pause", None)
            if callable(pause):
                pause()
            self._status = "paused"
            self._emit(qmp_event("STOP"))
        return Outcome({})

    def _cont(self, _args: dict[str, Any]) -> Outcome:
        if self._dump_active():
            raise QmpError("There is a dump in process, please wait.")
        if self._status == "inmigrate":
            raise QmpError("Migration is not finalized yet")
        if self._status != "running":
            resume = getattr(self._backend, "resume", None)
            if callable(resume):
                resume()
            self._status = "running"
            self._emit(qmp_event("RESUME"))
        return Outcome({})

    # -- dumps ---------------------------------------------------------------------------

    def _dump_active(self) -> bool:
        with self._dump_lock:
            return bool(self._dump["status"] == "active")

    def _dump_guest_memory(self, args: dict[str, Any]) -> Outcome:
        if self._dump_active():
            raise QmpError("There is a dump in process, please wait.")
        fmt = args.get("format", "elf")
        if fmt not in DUMP_FORMATS:
            raise QmpError(f"Parameter 'format' does not accept value '{fmt}'")
        if fmt != "elf" and (args["paging"] or "begin" in args or "length" in args):
            raise QmpError("kdump-compressed format doesn't support paging or filter")
        if "begin" in args and "length" not in args:
            raise QmpError("Parameter 'length' is missing")
        if "length" in args and "begin" not in args:
            raise QmpError("Parameter 'begin' is missing")
        protocol = args["protocol"]
        if protocol.startswith("fd:"):
            raise QmpError("ramdiscard: dump-guest-memory takes protocol 'file:PATH' (no fd passing)")
        if not protocol.startswith("file:"):
            raise QmpError("parameter 'protocol' must start with 'file:' or 'fd:'")
        if fmt != "elf":
            raise QmpError(f"ramdiscard: dump format '{fmt}' is not supported (only 'elf')")
        if "begin" in args:
            raise QmpError("ramdiscard: dump-guest-memory 'begin'/'length' are not supported")
        path = protocol[len("file:") :]
        with self._dump_lock:
            self._dump = {"status": "active", "completed": 0, "total": 0}
        if args.get("detach", False):
            thread = threading.Thread(target=self._run_dump, args=(path,), name="qmp-dump", daemon=True)
            self._dump_thread = thread
            thread.start()
            return Outcome({})
        error = self._run_dump(path)
        if error is not None:
            raise QmpError(error)
        return Outcome({})

    def _run_dump(self, path: str) -> str | None:
        """Write the dump; record and announce (DUMP_COMPLETED) how it ended. A running
        machine is stopped for it (STOP, status ``save-vm``) and resumed after (RESUME),
        as QEMU does."""
        error: str | None = None
        resume = self._status == "running"
        if resume:
            pause = getattr(self._backend, "pause", None)
            if callable(pause):
                pause()
            self._status = "save-vm"
            self._emit(qmp_event("STOP"))
        try:
            info = self._backend.dump(path)
            total = int(info.get("bytes", 0))
            state = {"status": "completed", "completed": total, "total": total}
        except (QmpError, RamDiscardError, ValueError, OSError) as exc:
            error = str(exc)
            state = {"status": "failed", "completed": 0, "total": 0}
        except Exception as exc:
            log.exception("dump-guest-memory failed")
            error = f"internal error in dump-guest-memory: {type(exc).__name__}: {exc}"
            state = {"status": "failed", "completed": 0, "total": 0}
        with self._dump_lock:
            self._dump = state
        self._emit(dump_completed_event(state, error))
        if resume:
            restart = getattr(self._backend, "resume", None)
            if callable(restart):
                restart()
            self._status = "running"
            self._emit(qmp_event("RESUME"))
        return error

    def _query_dump(self, _args: dict[str, Any]) -> Outcome:
        with self._dump_lock:
            return Outcome(dict(self._dump))

    def wait_dump(self, timeout: float | None = None) -> None:
        """Wait for a detached dump to end (used at shutdown)."""
        thread = self._dump_thread
        if thread is not None:
            thread.join(timeout)

    # -- the rest ------------------------------------------------------------------------

    def _migrate_cancel(self, _args: dict[str, Any]) -> Outcome:
        cancel = getattr(self._backend, "migrate_cancel", None)
        if callable(cancel):
            cancel()
        return Outcome({})

    def _quit(self, _args: dict[str, Any]) -> Outcome:
        self._emit(qmp_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
        return Outcome({}, quit=True)

    # -- project commands ----------------------------------------------------------------

    def _x_status(self, _args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.status())

    def _x_migrate(self, args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.migrate(args["uri"]))

    def _x_dump(self, args: dict[str, Any]) -> Outcome:
        return Outcome(self._backend.dump(args["path"]))
