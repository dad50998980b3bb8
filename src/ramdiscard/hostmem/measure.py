"""Read what the host says about this process's memory: /proc, /sys and mincore.

Rules:

* Everything is reported in bytes. Fields the kernel does not print read as 0, so a
  caller never has to handle absence.
* These are observations, not guarantees: RSS includes the interpreter's own heap, which
  moves by a few pages between two reads. Tests compare deltas with tolerances derived
  from page granularity, never absolute values.
* Hugetlb pages are not part of RSS; they appear in ``hugetlb`` (``HugetlbPages``) and in
  the pool counters of :func:`hugepage_pool`.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

_STATUS_FIELDS = {
    "VmRSS": "vm_rss",
    "RssAnon": "rss_anon",
    "RssFile": "rss_file",
    "RssShmem": "rss_shmem",
    "VmLck": "vm_lck",
    "VmPin": "vm_pin",
    "VmHWM": "vm_hwm",
    "HugetlbPages": "hugetlb",
}


@dataclass(frozen=True, slots=True)
class ProcStatus:
    """Memory counters of this process from /proc/self/status, in bytes."""

    vm_rss: int = 0
    rss_anon: int = 0
    rss_file: int = 0
    rss_shmem: int = 0
    vm_lck: int = 0
    vm_pin: int = 0
    vm_hwm: int = 0
    hugetlb: int = 0


def _kib_fields(path: str, wanted: dict[str, str]) -> dict[str, int]:
    values: dict[str, int] = {}
    with open(path, encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            attr = wanted.get(key)
            if attr is None:
                continue
            parts = rest.split()
            if not parts:
                continue
            number = int(parts[0])
            values[attr] = number * 1024 if len(parts) > 1 and parts[1] == "kB" else number
    return values


def proc_status() -> ProcStatus:
    """Snapshot of /proc/self/status (VmRSS, RssAnon, RssFile, RssShmem, VmLck, VmPin,
    VmHWM, HugetlbPages) in bytes; missing fields are 0."""
    return ProcStatus(**_kib_fields("/proc/self/status", _STATUS_FIELDS))


def open_fd_count() -> int:
    """Number of open file descriptors of this process (entries of /proc/self/fd)."""
    # listdir itself opens one fd for the directory; it is closed again before returning,
    # but it is listed, so subtract it to count only the fds that outlive the call.
    return len(os.listdir("/proc/self/fd")) - 1


def mapping_count() -> int:
    """Number of mappings (lines of /proc/self/maps)."""
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


def host_page_size() -> int:
    """The base page size (4 KiB on x86-64)."""
    return mmap.PAGESIZE


def thp_size() -> int:
    """Size of a transparent huge page (PMD size); 2 MiB if the kernel does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 << 20


def _meminfo() -> dict[str, int]:
    wanted = {
        "Hugepagesize": "Hugepagesize",
        "HugePages_Total": "HugePages_Total",
        "HugePages_Free": "HugePages_Free",
        "HugePages_Rsvd": "HugePages_Rsvd",
    }
    return _kib_fields("/proc/meminfo", wanted)


def hugepage_size() -> int:
    """Default hugetlb page size (Hugepagesize in /proc/meminfo); 2 MiB if absent."""
    return _meminfo().get("Hugepagesize", 2 << 20)


@dataclass(frozen=True, slots=True)
class HugePagePool:
    """The default-size hugetlb pool, in pages (not bytes)."""

    total: int
    free: int
    reserved: int
    page_size: int


def hugepage_pool() -> HugePagePool:
    """The hugetlb pool counters from /proc/meminfo (all 0 without hugetlb support)."""
    info = _meminfo()
    return HugePagePool(
        total=info.get("HugePages_Total", 0),
        free=info.get("HugePages_Free", 0),
        reserved=info.get("HugePages_Rsvd", 0),
        page_size=info.get("Hugepagesize", 2 << 20),
    )
