"""The layout's import rules (docs/architecture.md): every package imports only from its
own layer or below, and no two packages import each other, directly or through others.
Read from the source with ``ast``, type-only imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ramdiscard"

LAYER = {
    # 0: base
    "errors": 0, "units": 0, "interfaces": 0, "faults": 0, "fileio": 0, "interrupts": 0,
    "virtqueue": 0,
    # 1: the memory model
    "memory": 1,
    # 2: the RDM contract, host memory
    "rdm": 2, "hostmem": 2, "ramblocks": 2,
    # 3: providers and consumers
    "providers": 3, "consumers": 3,
    # 4: what moves or drives guest state
    "migration": 4, "dump": 4, "guest": 4, "vhost_user": 4,
    # 5: assembling a machine
    "machine": 5,
    # 6: control and tools
    "qmp": 6, "cli": 6, "bench": 6, "replay": 6, "fuzz": 6, "realguest": 6,
}  # fmt: skip


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "ramdiscard" else None


def _imports() -> list[tuple[str, str, int, str]]:
    """(importing unit, imported unit, line, file) for every import between units."""
    found: list[tuple[str, str, int, str]] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent)
        me = _unit(".".join(rel.with_suffix("").parts))
        if me is None or me == "__init__":
            continue  # the package root is the public facade: it re-exports every layer
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                if node.module == "ramdiscard":
                    targets = [f"ramdiscard.{a.name}" for a in node.names]
                else:
                    targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                other = _unit(target)
                if other is not None and other != me:
                    found.append((me, other, node.lineno, str(rel)))
    return found


IMPORTS = _imports()


def test_every_unit_has_a_layer() -> None:
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__", "__main__"}
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    missing = sorted((modules | packages) - set(LAYER))
    assert not missing, f"give these a layer in docs/architecture.md and here: {missing}"


def test_the_scan_sees_imports() -> None:
    pairs = {(a, b) for a, b, _line, _file in IMPORTS}
    assert ("rdm", "memory") in pairs and ("providers", "rdm") in pairs


@pytest.mark.parametrize("unit", sorted(LAYER))
def test_no_import_runs_up(unit: str) -> None:
    up = [
        f"{file}:{line} imports ramdiscard.{other} (layer {LAYER[other]})"
        for me, other, line, file in IMPORTS
        if me == unit and other in LAYER and LAYER[other] > LAYER[unit]
    ]
    assert not up, f"{unit} (layer {LAYER[unit]}): " + "; ".join(up)


def test_no_cycle_between_packages() -> None:
    edges: dict[str, set[str]] = {}
    for me, other, _line, _file in IMPORTS:
        edges.setdefault(me, set()).add(other)

    def reaches(start: str) -> set[str]:
        seen: set[str] = set()
        todo = [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in reaches(b))
    assert not cycles, cycles
