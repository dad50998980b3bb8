"""The QOM tree QMP shows: QEMU's object types, properties, values and error texts.

Rules:

* The property tables (names, types, QEMU's order, the value a fresh object reads, and
  what QEMU answers to ``qom-set`` of each) come from ``qemu-qom.json``, recorded from
  the QEMU release in :data:`QEMU_VERSION` by ``scripts/record-qemu-qom.py``; so every
  property QEMU has exists here, under the same type, with QEMU's error texts.
* Properties that describe this machine read their real values: for a virtio-mem
  device ``realized``, ``memaddr``, ``node``, ``memdev``, ``prealloc``,
  ``dynamic-memslots``, ``unplugged-inaccessible``, ``size``, ``requested-size``,
  ``block-size``, the PCI ``addr``/``legacy-addr`` (slots from 2 on, in device order); for
  a memory backend ``size``, ``prealloc``, ``share``, ``mem-path``. The others (PCI and
  virtio transport knobs ramdiscard has no equivalent for) read QEMU's values for the
  same command line.
* ``qom-set`` answers as QEMU does: device properties fixed at realize fail with
  "Attempt to set property ... after it was realized", read-only ones with "Property
  'T.P' is not writable" where T is the type QEMU names (``virtio-mem`` for the
  properties virtio-mem-pci aliases from its backend), a backend's ``size`` with "cannot
  change property size of memory-backend-ram " (QEMU's trailing space included).
  ``requested-size`` goes to the caller's setter. Setting ``realized`` to true, or a
  backend property QEMU lets change at run time to the value it already has, is
  accepted and changes nothing; any other value for those is refused (ramdiscard
  cannot re-realize a device or re-apply host memory policy: a documented difference).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, Final

from ramdiscard.qmp.protocol import QmpError

QEMU_VERSION: Final = (10, 0, 2)
"""The QEMU release whose QMP/QOM behaviour is matched (and reported by query-version)."""

DEVICE_TYPE: Final = "virtio-mem-pci"
VIRTIO_TYPE: Final = "virtio-mem"
PERIPHERAL: Final = "/machine/peripheral"
OBJECTS: Final = "/objects"
FIRST_PCI_SLOT: Final = 2
"""QEMU's pc machine (no -nodefaults devices) puts the first -device at slot 2."""


@cache
def schema() -> dict[str, Any]:
    text = resources.files("ramdiscard.qmp").joinpath("qemu-qom.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def type_properties(typename: str) -> list[dict[str, Any]]:
    """The recorded properties of ``typename`` (qom-list entries with values)."""
    props: list[dict[str, Any]] = schema()["types"][typename]
    return props


def list_properties(typename: str) -> list[dict[str, Any]] | None:
    """qom-list-properties of ``typename``, or None for a type not recorded."""
    table: dict[str, list[dict[str, Any]]] = schema()["qom-list-properties"]
    return table.get(typename)


def device_list_properties(typename: str) -> list[dict[str, Any]] | None:
    table: dict[str, list[dict[str, Any]]] = schema()["device-list-properties"]
    return table.get(typename)


def known_types() -> frozenset[str]:
    return frozenset(schema()["qom-list-properties"]) | frozenset(schema()["types"])


Getter = Callable[[], Any]
Setter = Callable[[Any], None]


@dataclass
class QomProperty:
    type: str
    get: Getter
    set: Setter | None = None


@dataclass(eq=False)
class QomNode:
    """One object of the QOM tree: its type name, properties and children, in order."""

    name: str
    typename: str
    parent: QomNode | None = None
    props: dict[str, QomProperty] = field(default_factory=dict)
    children: dict[str, QomNode] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)

    def add_child(self, name: str, typename: str) -> QomNode:
        child = QomNode(name, typename, parent=self)
        self.children[name] = child
        self.order.append(name)
        return child

    def add_prop(self, name: str, prop: QomProperty) -> None:
        if name not in self.props and name not in self.children:
            self.order.append(name)
        self.props[name] = prop

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
        for name in self.order:
            if name == "type":
                continue
            if name in self.children:
                out.append({"name": name, "type": f"child<{self.children[name].typename}>"})
            else:
                out.append({"name": name, "type": self.props[name].type})
        return out

    def get(self, prop: str) -> Any:
        if prop == "type":
            return self.typename
        if prop in self.props:
            return self.props[prop].get()
        if prop in self.children:
            return self.children[prop].path
        raise QmpError(f"Property '{self.typename}.{prop}' not found")

    def set(self, prop: str, value: Any) -> None:
        if prop == "type" or prop in self.children:
            raise QmpError(f"Property '{self.typename}.{prop}' is not writable")
        spec = self.props.get(prop)
        if spec is None:
            raise QmpError(f"Property '{self.typename}.{prop}' not found")
        if spec.set is None:
            raise QmpError(f"Property '{self.typename}.{prop}' is not writable")
        spec.set(value)


def _constant(value: Any) -> Getter:
    return lambda: value


def _raiser(text: str) -> Callable[..., Any]:
    def fail(*_args: Any) -> Any:
        raise QmpError(text)

    return fail


def _same_or_refuse(typename: str, name: str, current: Getter) -> Setter:
    def setter(value: Any) -> None:
        if value != current() or type(value) is not type(current()):
            raise QmpError(
                f"ramdiscard: property '{name}' of a {typename} cannot be changed at run time "
                f"(it is {json.dumps(current())})"
            )

    return setter


def populate(
    node: QomNode,
    typename: str,
    values: dict[str, Getter],
    *,
    texts: dict[str, str],
    setters: dict[str, Setter] | None = None,
    child: Callable[[QomNode, str, str, Any], None] | None = None,
) -> None:
    """Give ``node`` every recorded property of ``typename`` in QEMU's order.

    ``values`` overrides what a property reads; ``texts`` maps the recorded
    placeholders (``{id}``, ``{memdev}``, ``/machine/peripheral/vm0``...) to this
    object's; ``setters`` overrides what setting a property does; ``child`` builds the
    child objects (called with the node, the child name, its type and recorded value).
    """
    setters = setters or {}

    def fill(text: str) -> str:
        for raw, real in texts.items():
            text = text.replace(raw, real)
        return text

    for entry in type_properties(typename):
        name, ptype = fill(entry["name"]), entry["type"]
        if name == "type":
            continue
        if ptype.startswith("child<"):
            if child is not None:
                child(node, name, ptype[len("child<") : -1], entry["get"].get("ok"))
            continue
        got = entry["get"]
        if name in values:
            getter = values[name]
        elif "error" in got:
            getter = _raiser(fill(got["error"]))
        else:
            recorded = got["ok"]
            getter = _constant(fill(recorded) if isinstance(recorded, str) else recorded)
        setter: Setter | None
        if name in setters:
            setter = setters[name]
        elif "set" not in entry:
            setter = _same_or_refuse(typename, name, getter)
        elif "error" in entry["set"]:
            setter = _raiser(fill(entry["set"]["error"]))
        else:
            setter = _same_or_refuse(typename, name, getter)
        node.add_prop(name, QomProperty(ptype, getter, setter))


def memory_region_child(container: str, size: int) -> Callable[[QomNode, str, str, Any], None]:
    """Builds the memory-region child a memory backend owns."""

    def build(node: QomNode, _name: str, typename: str, _recorded: Any) -> None:
        mr = node.add_child(f"{node.name}[0]", typename)  # QEMU names it after its owner
        populate(
            mr,
            "memory-region",
            {"container": _constant(container), "addr": _constant(0), "size": _constant(size)},
            texts={},
        )

    return build


# -- path resolution ---------------------------------------------------------------------


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
