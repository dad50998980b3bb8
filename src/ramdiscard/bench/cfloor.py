"""C floors for the benchmarks: the project's own small C programs (shipped as package
data in ``ramdiscard/bench/c/``), compiled at bench time and run beside our code.

Rules:

* :func:`build` compiles one program with ``cc -O2`` (``$CC`` if set) into a cache
  directory (``$RAMDISCARD_CACHE``, else ``$XDG_CACHE_HOME/ramdiscard`` or
  ``~/.cache/ramdiscard``, subdirectory ``cfloor``), named after a hash of the source
  and the compiler path, so a changed source or compiler gets a new binary and concurrent
  runs never see a half-written one (compile to a temporary name, then rename).
* Where no compiler exists, or compiling fails, :func:`build` raises :class:`NoFloor`
  with a one-line reason; the benchmark then prints a "C floor skipped" row instead.
* :class:`PlugFloor` drives ``plugfloor.c`` one cycle per request (so the caller can
  alternate our cycle and the C cycle under the same machine load);
  :func:`bitscan_floor` runs ``bitfloor.c`` over a bitmap handed over in a file.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from ramdiscard.errors import HostError

PROGRAMS = ("plugfloor", "bitfloor")


class NoFloor(HostError):
    """The C floor cannot be measured here (no compiler, a failed build or run);
    ``str()`` is the one-line reason, ``errno`` ENOENT."""

    def __init__(self, reason: str) -> None:
        super().__init__(_errno.ENOENT, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason


def cache_dir() -> Path:
    env = os.environ.get("RAMDISCARD_CACHE")
    if env:
        root = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "ramdiscard"
    return root / "cfloor"


def compiler() -> str | None:
    """Path of the C compiler (``$CC``, else ``cc``, ``gcc``, ``clang``), None if none."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


def source(program: str) -> bytes:
    if program not in PROGRAMS:
        raise ValueError(f"unknown C floor program {program!r}")
    return (resources.files("ramdiscard.bench") / "c" / f"{program}.c").read_bytes()


def build(program: str) -> Path:
    """The compiled program, built on first use. Raises NoFloor with the reason."""
    src = source(program)
    cc = compiler()
    if cc is None:
        raise NoFloor("no compiler: C floor skipped (install gcc, or set CC)")
    digest = hashlib.sha256(src + b"\0" + cc.encode()).hexdigest()[:16]
    out_dir = cache_dir()
    exe = out_dir / f"{program}-{digest}"
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NoFloor(f"cannot create the C floor cache {out_dir}: {exc.strerror}") from None
    with tempfile.TemporaryDirectory(prefix=f"{program}-", dir=out_dir) as tmp:
        c_file = Path(tmp) / f"{program}.c"
        c_file.write_bytes(src)
        tmp_exe = Path(tmp) / program
        proc = subprocess.run(
            [cc, "-O2", "-o", str(tmp_exe), str(c_file)], capture_output=True, text=True, timeout=120
        )
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["(no output)"])[0]
            raise NoFloor(f"{Path(cc).name} -O2 {program}.c failed: {first}")
        os.replace(tmp_exe, exe)
    return exe


class PlugFloor:
    """One ``plugfloor`` process: ``cycle(mode)`` runs one plug + unplug in C and returns
    ``(plug_ns, unplug_ns)``. ``mode``: ``cold`` (the pin faults memory in), ``warm`` (an
    untimed populate first), ``prealloc`` (a timed populate inside the plug).
    Raises NoFloor if the program cannot be built or fails."""

    def __init__(self, backing: str, thp: bool, block_size: int, blocks: int, slots: int) -> None:
        exe = build("plugfloor")
        kind = "memfd" if backing == "memfd" else "anon"
        self._proc = subprocess.Popen(
            [str(exe), kind, str(int(thp)), str(block_size), str(blocks), str(slots)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self.close()
            raise NoFloor("plugfloor exited early")
        msg: dict[str, Any] = json.loads(line)
        if "error" in msg:
            self.close()
            raise NoFloor(f"plugfloor: {msg['error']}")
        return msg

    def cycle(self, mode: str) -> tuple[int, int]:
        assert self._proc.stdin is not None
        if mode not in ("cold", "warm", "prealloc"):
            raise ValueError(f"unknown plugfloor mode {mode!r}")
        self._proc.stdin.write(mode + "\n")
        self._proc.stdin.flush()
        msg = self._answer()
        return int(msg["plug_ns"]), int(msg["unplug_ns"])

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write("q\n")
                self._proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> PlugFloor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def bitscan_floor(
    words: bytes, nbits: int, start: int, end: int, min_ms: float, mode: str = "replay"
) -> dict[str, int]:
    """Best ns of the C run replay (``mode="replay"``) over ``[start, end)`` of the bitmap
    ``words`` (little-endian 64-bit words), with the ``runs`` and ``bits`` it found; or of
    the all-set test (``mode="allset"``: ``runs`` is 1 if every bit is set, else 0).
    Raises NoFloor."""
    if mode not in ("replay", "allset"):
        raise ValueError(f"unknown bitfloor mode {mode!r}")
    exe = build("bitfloor")
    with tempfile.NamedTemporaryFile(prefix="bitfloor-", suffix=".bin") as f:
        f.write(words)
        f.flush()
        proc = subprocess.run(
            [str(exe), mode, f.name, str(nbits), str(start), str(end), str(min_ms)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if proc.returncode != 0:
        raise NoFloor(f"bitfloor failed: {proc.stderr.strip() or proc.returncode}")
    out: dict[str, int] = json.loads(proc.stdout)
    return out
