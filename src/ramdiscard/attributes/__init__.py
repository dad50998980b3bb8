"""guest_memfd attributes: the second RamDiscardManager provider (shared = populated)."""

from ramdiscard.attributes.attributes import KvmVmLike, RamBlockAttributes
from ramdiscard.attributes.gmem import GmemUnavailable, GmemVm

__all__ = ["GmemUnavailable", "GmemVm", "KvmVmLike", "RamBlockAttributes"]
