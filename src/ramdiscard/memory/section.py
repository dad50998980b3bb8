"""MemoryRegionSection: one contiguous piece of one memory region as an address space sees it.

The class is defined in :mod:`ramdiscard.memory.region`, next to the region it names (the
two refer to each other); ``ramdiscard.memory.section`` is a public import path of it.
"""

from ramdiscard.memory.region import MemoryRegionSection

__all__ = ["MemoryRegionSection"]
