"""MemoryRegionSection: one contiguous piece of one memory region as an address space sees it.

A section is a value: frozen, compared field by field (the region by identity). Offsets
are plain ints, so the 128-bit arithmetic QEMU needs does not arise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ramdiscard.errors import InvalidArgument

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion


_new = object.__new__


@dataclass(frozen=True, slots=True)
class MemoryRegionSection:
    """``size`` bytes of ``mr`` starting at ``offset_within_region``, seen at
    ``offset_within_address_space`` (guest-physical address or IOVA)."""

    mr: MemoryRegion
    offset_within_region: int
    size: int
    offset_within_address_space: int = 0
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.offset_within_region < 0 or self.size < 0 or self.offset_within_address_space < 0:
            raise InvalidArgument(
                f"section of {self.mr.name!r}: negative offset or size "
                f"(offset {self.offset_within_region:#x}, size {self.size:#x})"
            )

    @property
    def end(self) -> int:
        """First region offset after the section."""
        return self.offset_within_region + self.size

    @property
    def address_end(self) -> int:
        """First address-space offset after the section."""
        return self.offset_within_address_space + self.size

    def intersect(self, offset: int, size: int) -> MemoryRegionSection | None:
        """The part of this section inside region range ``[offset, offset + size)``.

        Returns a new section with both offsets shifted consistently and every other field
        kept, or None when the intersection is empty.
        """
        start = max(self.offset_within_region, offset)
        end = min(self.end, offset + size)
        if end <= start:
            return None
        if start == self.offset_within_region and end == self.end:
            return self
        # Built without __init__ through the slot descriptors: the fields are derived from
        # a valid section, and replays create one section per run, so this is a hot path.
        part = _new(MemoryRegionSection)
        _set_mr(part, self.mr)
        _set_offset(part, start)
        _set_size(part, end - start)
        _set_address(part, self.offset_within_address_space + (start - self.offset_within_region))
        _set_readonly(part, self.readonly)
        return part

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return (
            f"MemoryRegionSection({self.mr.name!r}, "
            f"[{self.offset_within_region:#x}+{self.size:#x}] @ {self.offset_within_address_space:#x}{ro})"
        )


_SetField = Callable[[MemoryRegionSection, Any], None]
_slots = MemoryRegionSection.__dict__
_set_mr: _SetField = _slots["mr"].__set__
_set_offset: _SetField = _slots["offset_within_region"].__set__
_set_size: _SetField = _slots["size"].__set__
_set_address: _SetField = _slots["offset_within_address_space"].__set__
_set_readonly: _SetField = _slots["readonly"].__set__
