"""docs/security.md and docs/reliability.md cite tests as ``file::test``; each must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REF = re.compile(r"`((?:tests/[\w/]+\.py)?)::(\w+)")


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


@pytest.mark.parametrize("doc", ["docs/security.md", "docs/reliability.md"])
def test_cited_tests_exist(doc: str) -> None:
    text = (ROOT / doc).read_text()
    current: Path | None = None
    cited = 0
    missing: list[str] = []
    for line in text.splitlines():
        for file, name in REF.findall(line):
            if file:
                current = ROOT / file
            assert current is not None, f"{doc}: '::{name}' without a file before it"
            if not current.is_file() or name not in _functions(current):
                missing.append(f"{current.relative_to(ROOT)}::{name}")
            cited += 1
    assert cited > 0 or doc.endswith("reliability.md")
    assert not missing, f"{doc} cites tests that do not exist: {missing}"
