"""The /proc and /sys readers."""

from __future__ import annotations

import mmap
import os

from ramdiscard.hostmem import (
    ProcStatus,
    host_page_size,
    hugepage_pool,
    hugepage_size,
    mapping_count,
    open_fd_count,
    proc_status,
    thp_size,
)
from ramdiscard.units import MiB


def test_proc_status_fields() -> None:
    status = proc_status()
    assert isinstance(status, ProcStatus)
    assert status.vm_rss > 0 and status.vm_hwm >= status.vm_rss
    assert status.rss_anon + status.rss_file + status.rss_shmem == status.vm_rss
    assert status.vm_lck >= 0 and status.vm_pin >= 0


def test_sizes() -> None:
    assert host_page_size() == mmap.PAGESIZE
    assert thp_size() >= 2 * MiB or thp_size() > 0
    assert hugepage_size() == hugepage_pool().page_size > host_page_size()


def test_fd_and_mapping_counts_track_changes() -> None:
    fds, maps = open_fd_count(), mapping_count()
    # a file mapping: anonymous ones may merge with a neighbour and not add a line
    fd = os.memfd_create("count")
    os.ftruncate(fd, 8 * MiB)
    m = mmap.mmap(fd, 8 * MiB)
    try:
        assert open_fd_count() == fds + 2  # ours and the dup the mmap object keeps
        assert mapping_count() == maps + 1
    finally:
        m.close()
        os.close(fd)
    assert (open_fd_count(), mapping_count()) == (fds, maps)
