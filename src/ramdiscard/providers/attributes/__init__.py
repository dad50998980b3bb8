"""guest_memfd attributes: the second RamDiscardManager provider (shared = populated)."""

from ramdiscard.providers.attributes.attributes import RamBlockAttributes
from ramdiscard.providers.attributes.gmem import GmemUnavailable, open_guest_memfd_vm, unevictable_bytes

__all__ = ["GmemUnavailable", "RamBlockAttributes", "open_guest_memfd_vm", "unevictable_bytes"]
