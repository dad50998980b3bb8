"""ramdiscard.fileio: the one path every output, input and backing file takes."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ramdiscard import fileio, interrupts
from ramdiscard.errors import HostMemoryError
from ramdiscard.fileio import FileRefused, create_output, open_input
from ramdiscard.hostmem import RamBlock
from ramdiscard.units import MiB


def specials(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    node = tmp_path / "zero"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 5))
    d = tmp_path / "dir"
    d.mkdir()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    return {"FIFO": fifo, "character device": node, "directory": d, "symbolic link": link}


def test_create_output_refuses_every_non_regular_path_and_leaves_it(tmp_path: Path) -> None:
    for kind, path in specials(tmp_path).items():
        before = os.lstat(path)
        with pytest.raises(FileRefused) as info, create_output(path, "out"):
            raise AssertionError("the body must not run")
        assert kind in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
        after = os.lstat(path)
        assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert sorted(os.listdir(tmp_path)) == ["dir", "fifo", "link", "zero"]


def test_create_output_is_0600_under_any_umask_and_replaces_atomically(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for umask in (0o000, 0o277):
        out.write_bytes(b"old")
        os.chmod(out, 0o644)
        old = os.umask(umask)
        try:
            with create_output(out, "out") as f:
                f.write(b"new")
                assert out.read_bytes() == b"old"  # not visible until complete
        finally:
            os.umask(old)
        assert out.read_bytes() == b"new" and stat.S_IMODE(out.stat().st_mode) == 0o600
        assert os.listdir(tmp_path) == ["out"]


def test_create_output_failure_keeps_the_destination_and_removes_only_its_temp(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"keep")
    other = tmp_path / "unrelated"
    other.write_bytes(b"x")
    with pytest.raises(RuntimeError), create_output(out, "out") as f:
        f.write(b"partial")
        raise RuntimeError("write failed")
    assert out.read_bytes() == b"keep"
    assert sorted(os.listdir(tmp_path)) == ["out", "unrelated"]


def test_output_onto_a_guest_memory_file_is_refused_by_inode(tmp_path: Path) -> None:
    backing = tmp_path / "ram"
    with RamBlock(2 * MiB, "file", path=backing) as block:
        block.write(0, b"guest")
        alias = tmp_path / "alias"
        os.link(backing, alias)
        for p in (backing, alias):
            with pytest.raises(FileRefused, match="backing guest memory"), create_output(p, "dump"):
                pass
        assert block.read(0, 5) == b"guest" and backing.stat().st_size == 2 * MiB
    with create_output(alias, "dump") as f:  # the block is closed: no longer guest memory
        f.write(b"ok")


def test_open_input_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    for kind, path in specials(tmp_path).items():
        if kind == "symbolic link":
            continue  # followed for inputs: a dangling one is simply missing
        with pytest.raises(FileRefused, match=kind):
            open_input(path, "snapshot")
    (tmp_path / "ok").write_bytes(b"data")
    with open_input(tmp_path / "ok") as f:
        assert f.read() == b"data"


def test_backing_file_lock_excludes_a_second_block_and_non_empty_needs_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    with RamBlock(2 * MiB, "file", path=path, allow_existing_data=False) as first:
        assert first.created
        first.write(0, b"first")
        with pytest.raises(HostMemoryError, match="in use by another machine"):
            RamBlock(2 * MiB, "file", path=path)
        assert first.read(0, 5) == b"first" and path.exists()
    with pytest.raises(fileio.ExistingData, match="holds 2097152 bytes"):
        RamBlock(2 * MiB, "file", path=path, allow_existing_data=False)
    with RamBlock(2 * MiB, "file", path=path) as again:
        assert not again.created and again.read(0, 5) == b"first"
    (tmp_path / "s").mkdir()
    for kind, special in specials(tmp_path / "s").items():
        if kind == "symbolic link":
            continue  # followed for backing files: a dangling one is simply missing
        with pytest.raises(FileRefused, match=kind):
            RamBlock(2 * MiB, "file", path=special)


def test_unlink_created_only_removes_the_same_file(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"1")
    fid = fileio.FileId.of(p.stat())
    os.link(p, tmp_path / "keep")  # keeps the inode alive, so its number cannot be reused
    p.unlink()
    p.write_bytes(b"2")  # someone else's file now has that name
    assert not fileio.unlink_created(p, fid) and p.read_bytes() == b"2"
    assert fileio.unlink_created(p, fileio.FileId.of(p.stat())) and not p.exists()


def test_deferred_holds_a_signal_until_the_section_ends() -> None:
    restore = interrupts.install()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt, match="held off"), interrupts.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 5
            while interrupts.pending() is None:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            done.append("released")
        assert done == ["released"] and interrupts.pending() is None
    finally:
        restore()


def test_deferred_in_a_child_with_python_default_sigint(tmp_path: Path) -> None:
    code = (
        "import os, signal, time\n"
        "from ramdiscard import interrupts\n"
        "try:\n"
        "    with interrupts.deferred():\n"
        "        os.kill(os.getpid(), signal.SIGINT)\n"
        "        time.sleep(0.2)\n"
        "        print('section done', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupt after', flush=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.split("\n")[:2] == ["section done", "interrupt after"], r.stderr


def test_a_second_signal_between_two_sections_does_not_skip_the_second() -> None:
    restore = interrupts.install()
    released: list[str] = []
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # the handler raises here
                    time.sleep(0.001)
            finally:
                with interrupts.deferred():
                    released.append("first")
                os.kill(os.getpid(), signal.SIGTERM)  # lands between the two sections
                time.sleep(0.01)
                with interrupts.deferred():
                    released.append("second")
        assert released == ["first", "second"]
    finally:
        restore()
    assert interrupts.pending() is None
