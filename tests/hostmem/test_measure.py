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
    fields = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    # VmLck and VmPin do not move between the two reads (nothing locks or pins here).
    assert status.vm_lck == int(fields["VmLck"][0]) * 1024
    assert status.vm_pin == int(fields["VmPin"][0]) * 1024


def test_sizes() -> None:
    assert host_page_size() == mmap.PAGESIZE
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", encoding="ascii") as f:
            expected = int(f.read())
    except FileNotFoundError:
        expected = 2 * MiB  # documented fallback for kernels without THP
    assert thp_size() == expected
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
