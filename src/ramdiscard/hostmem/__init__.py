"""Host memory for ramdiscard: real mappings that can be discarded and populated.

* :class:`RamBlock` maps anonymous, memfd (optionally hugetlb) or file-backed memory
  and frees it with the primitive that really frees memory for that backing;
  :mod:`ramdiscard.hostmem.backing` acquires and maps that memory for it.
* :mod:`ramdiscard.hostmem.measure` reads what the host says about this process's memory.
* :mod:`ramdiscard.hostmem.syscalls` is the thin ctypes/stdlib syscall layer.
* :mod:`ramdiscard.bench.hostmem` compares the wrappers against raw syscalls.
"""

from ramdiscard.hostmem.backing import Backing
from ramdiscard.hostmem.measure import (
    HugePagePool,
    ProcStatus,
    host_page_size,
    hugepage_pool,
    hugepage_size,
    mapping_count,
    open_fd_count,
    proc_status,
    thp_size,
)
from ramdiscard.hostmem.ramblock import RamBlock, ResizeHook

__all__ = [
    "Backing",
    "HugePagePool",
    "ProcStatus",
    "RamBlock",
    "ResizeHook",
    "host_page_size",
    "hugepage_pool",
    "hugepage_size",
    "mapping_count",
    "open_fd_count",
    "proc_status",
    "thp_size",
]
