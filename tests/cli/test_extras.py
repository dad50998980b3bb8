"""The library installs and imports without the ``cli`` extra; the CLI says what is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sample_trace

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
CLI_EXTRA = ("rich", "matplotlib", "qemu")


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=timeout
    )


def test_importing_every_library_module_imports_no_cli_extra() -> None:
    code = f"""
import importlib, json, pkgutil, sys
import ramdiscard
names = []
for info in pkgutil.walk_packages(ramdiscard.__path__, "ramdiscard."):
    if info.name.startswith("ramdiscard.cli") or info.name.endswith("__main__"):
        continue
    importlib.import_module(info.name)
    names.append(info.name)
loaded = sorted({{m.partition(".")[0] for m in sys.modules}} & set({CLI_EXTRA!r}))
print(json.dumps({{"modules": names, "loaded": loaded}}))
"""
    r = _python(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    # the walk did reach the library's layers
    for pkg in ("ramdiscard.providers.virtio_mem", "ramdiscard.qmp.server", "ramdiscard.replay.trace",
                "ramdiscard.migration", "ramdiscard.machine"):  # fmt: skip
        assert pkg in out["modules"]
    assert out["loaded"] == []


def test_cli_parser_and_serve_import_no_cli_extra() -> None:
    r = _python(
        "import sys; from ramdiscard.cli.main import build_parser; build_parser(); "
        f"print(sorted({{m.partition('.')[0] for m in sys.modules}} & set({CLI_EXTRA!r})))"
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def _blocked_cli(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess[str]:
    # sys.modules[name] = None makes every import of ``name`` fail as if it were absent
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "from ramdiscard.cli.main import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return _python(code)


@pytest.mark.parametrize(
    ("blocked", "args", "dist"),
    [
        (("matplotlib",), ("demo", "--region-size", "128M", "--backend", "null", "--quiet"), "matplotlib"),
        (("rich",), ("demo", "--region-size", "128M", "--backend", "null", "--no-plot"), "rich"),
        (("rich",), ("run", "examples/small-vfio.toml"), "rich"),
        (("rich",), ("bench", "--quick", "--only", "nothing"), "rich"),
        (("qemu",), ("top", "--qmp", "unix:/nonexistent/q.sock", "--once", "--json"), "qemu.qmp"),
        (("matplotlib",), ("replay", "examples/traces/qemu-virtio-mem-trace-sample.log", "--plot", "r.png"),
         "matplotlib"),
    ],
)
def test_missing_extra_gives_one_line_hint(
    blocked: tuple[str, ...], args: tuple[str, ...], dist: str
) -> None:
    r = _blocked_cli(blocked, *args)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith(f"ramdiscard: error: ramdiscard {args[0]} needs {dist}")
    assert "pip install 'ramdiscard[cli]'" in r.stderr
    assert r.stdout == ""


def test_commands_without_the_extra_still_work() -> None:
    r = _blocked_cli(CLI_EXTRA, "run", str(ROOT / "examples/small-vfio.toml"), "--check")
    assert r.returncode == 0, r.stderr
    assert ": ok: 1 device(s)" in r.stdout
    r = _blocked_cli(CLI_EXTRA, "replay", str(sample_trace()), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["mismatches"] == []
    r = _blocked_cli(CLI_EXTRA, "bench", "--json", "--quick", "--only", "no-such-area")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
