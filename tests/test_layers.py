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


def _parse(path: Path) -> ast.Module:
    """``ast.parse`` of ``path``, retried on CPython 3.11's spurious "AST constructor
    recursion depth mismatch" SystemError (gh-106905: its counter is shared with other
    threads of the test process); a real syntax error still raises."""
    for attempt in range(3):
        try:
            return ast.parse(path.read_text(), str(path))
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _imports() -> list[tuple[str, str, int, str]]:
    """(importing unit, imported unit, line, file) for every import between units."""
    found: list[tuple[str, str, int, str]] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent)
        me = _unit(".".join(rel.with_suffix("").parts))
        if me is None or me == "__init__":
            continue  # the package root is the public facade: it re-exports every layer
        for node in ast.walk(_parse(path)):
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


def _module_name(path: Path) -> tuple[str, bool]:
    """(dotted name, is a package ``__init__``) of a source file."""
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _module_imports() -> dict[str, set[str]]:
    """Every module's imports of other ramdiscard modules, read with ``ast`` from every
    import statement in the file: top level, under ``if TYPE_CHECKING:`` and inside
    functions alike. ``from pkg import name`` counts as importing ``pkg.name`` when that
    is a module, else ``pkg``; relative imports are resolved."""
    files = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}
    modules = {name for name, _pkg in files}
    graph: dict[str, set[str]] = {}
    for (name, is_pkg), path in files.items():
        package = name if is_pkg else name.rpartition(".")[0]
        found = graph.setdefault(name, set())
        for node in ast.walk(_parse(path)):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    found.add(sub if sub in modules else source)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        found &= modules
        found.discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component: list[str] = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
    assert _cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_the_module_scan_sees_type_checking_and_local_imports() -> None:
    graph = _module_imports()
    # rdm/manager.py imports memory.region only under TYPE_CHECKING; the scan must see it.
    assert "ramdiscard.memory.region" in graph["ramdiscard.rdm.manager"]
    assert "ramdiscard.rdm.notify" in graph["ramdiscard.rdm.manager"]
    # fuzz/targets/migration.py imports the vfio package inside a function.
    assert "ramdiscard.consumers.vfio" in graph["ramdiscard.fuzz.targets.migration"]


def test_no_cycle_between_modules_of_a_package() -> None:
    """No import circle between the modules of one package (subpackages and ``__init__``
    included): a package's modules form layers of their own."""
    graph = _module_imports()
    inside = {me: {other for other in targets if _unit(other) == _unit(me)} for me, targets in graph.items()}
    assert not _cycles(inside), _cycles(inside)
