"""Fixtures for the host-memory tests: block kinds, a hugetlb pool, scratch dirs.

The hugetlb fixtures change machine state (``vm.nr_hugepages``, a hugetlbfs mount) only
when they must, and always restore it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.hostmem import RamBlock, hugepage_pool, proc_status
from ramdiscard.units import MiB

NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
POOL_PAGES = 64  # 128 MiB of 2 MiB pages: enough for every hugetlb test at once


@dataclass(frozen=True)
class Kind:
    """One way of backing a block, plus the /proc/self/status counter that accounts it."""

    id: str
    backing: str
    counter: str  # ProcStatus field holding this kind's memory
    hugetlb: bool = False
    thp: bool = True
    on_file: bool = False

    def kwargs(self, scratch: Path) -> dict[str, Any]:
        kw: dict[str, Any] = {"backing": self.backing}
        if self.backing == "anonymous":
            kw["thp"] = self.thp
        if self.backing == "memfd" and self.hugetlb:
            kw["hugepages"] = True
        if self.on_file:
            fd, name = tempfile.mkstemp(dir=scratch, prefix="block-")
            os.close(fd)
            kw["path"] = name
        return kw


KINDS = [
    Kind("anon_thp", "anonymous", "rss_anon", thp=True),
    Kind("anon_4k", "anonymous", "rss_anon", thp=False),
    Kind("memfd", "memfd", "rss_shmem"),
    Kind("file_shm", "file", "rss_shmem", on_file=True),
    Kind("memfd_hugetlb", "memfd", "hugetlb", hugetlb=True),
    Kind("file_hugetlbfs", "file", "hugetlb", hugetlb=True, on_file=True),
]
KIND_IDS = [k.id for k in KINDS]


def counter(kind: Kind) -> int:
    return int(getattr(proc_status(), kind.counter))


@pytest.fixture(scope="session")
def hugetlb_pool() -> Iterator[int]:
    """Make sure at least POOL_PAGES free default-size huge pages exist; restore
    vm.nr_hugepages afterwards. Yields the number of free pages. Skips if impossible."""
    try:
        old = NR_HUGEPAGES.read_text().strip()
    except OSError as exc:
        pytest.skip(f"no hugetlb support: {exc}")
    pool = hugepage_pool()
    changed = False
    if pool.free < POOL_PAGES:
        try:
            NR_HUGEPAGES.write_text(str(pool.total + POOL_PAGES - pool.free))
            changed = True
        except OSError as exc:
            pytest.skip(f"cannot grow the hugetlb pool (needs root): {exc}")
    try:
        free = hugepage_pool().free
        if free < POOL_PAGES:
            pytest.skip(f"kernel gave only {free} of {POOL_PAGES} huge pages (fragmented memory)")
        yield free
    finally:
        if changed:
            NR_HUGEPAGES.write_text(old)


@pytest.fixture(scope="session")
def hugetlbfs_dir(hugetlb_pool: int) -> Iterator[Path]:
    """A directory on hugetlbfs: an existing mount, or a private one mounted (and
    unmounted afterwards) in a temporary directory. Skips if neither is possible."""
    with open("/proc/mounts", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            # Another test run's private mount may vanish under us: only reuse system mounts.
            private = Path(fields[1]).name.startswith("ramdiscard-hugetlbfs-")
            if fields[2] == "hugetlbfs" and not private and os.access(fields[1], os.W_OK):
                scratch = Path(tempfile.mkdtemp(dir=fields[1], prefix="ramdiscard-"))
                yield scratch
                shutil.rmtree(scratch, ignore_errors=True)
                return
    mountpoint = Path(tempfile.mkdtemp(prefix="ramdiscard-hugetlbfs-"))
    result = subprocess.run(
        ["mount", "-t", "hugetlbfs", "none", str(mountpoint)], capture_output=True, text=True
    )
    if result.returncode != 0:
        mountpoint.rmdir()
        pytest.skip(f"cannot mount hugetlbfs: {result.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        for entry in mountpoint.iterdir():
            with contextlib.suppress(OSError):
                entry.unlink()
        subprocess.run(["umount", str(mountpoint)], check=False)
        with contextlib.suppress(OSError):
            mountpoint.rmdir()


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    scratch = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="ramdiscard-test-"))
    yield scratch
    shutil.rmtree(scratch, ignore_errors=True)


BlockFactory = Callable[..., RamBlock]


@pytest.fixture(params=KINDS, ids=KIND_IDS)
def kind(request: pytest.FixtureRequest) -> Kind:
    k: Kind = request.param
    if k.hugetlb:
        request.getfixturevalue("hugetlb_pool")
    if k.id == "file_hugetlbfs":
        request.getfixturevalue("hugetlbfs_dir")
    return k


@pytest.fixture
def scratch_dir(kind: Kind, request: pytest.FixtureRequest, shm_dir: Path) -> Path:
    """Where file-backed blocks of the current kind put their files."""
    if kind.id == "file_hugetlbfs":
        hugetlbfs: Path = request.getfixturevalue("hugetlbfs_dir")
        return hugetlbfs
    return shm_dir


@pytest.fixture
def make_block(kind: Kind, scratch_dir: Path) -> Iterator[BlockFactory]:
    """Factory for blocks of the current kind; every block is closed at teardown."""
    scratch = scratch_dir
    blocks: list[RamBlock] = []

    def make(size: int = 64 * MiB, **extra: Any) -> RamBlock:
        kw = kind.kwargs(scratch)
        kw.update(extra)
        block = RamBlock(size, **kw)
        blocks.append(block)
        return block

    yield make
    for block in blocks:
        block.close()
