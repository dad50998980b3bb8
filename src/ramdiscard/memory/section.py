"""MemoryRegionSection: one contiguous piece of one memory region as an address space sees it.

A section is a value: frozen, compared field by field (the region by identity). Offsets
are plain ints, so the 128-bit arithmetic QEMU needs does not arise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.errors import InvalidArgument

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion


_new = object.__new__
_set = object.__setattr__


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
        # Built without __init__: the fields are derived from a valid section, and
        # replays create one section per run, so this is a hot path.
        part = _new(MemoryRegionSection)
        _set(part, "mr", self.mr)
        _set(part, "offset_within_region", start)
        _set(part, "size", end - start)
        _set(
            part,
            "offset_within_address_space",
            self.offset_within_address_space + (start - self.offset_within_region),
        )
        _set(part, "readonly", self.readonly)
        return part

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return (
            f"MemoryRegionSection({self.mr.name!r}, "
            f"[{self.offset_within_region:#x}+{self.size:#x}] @ {self.offset_within_address_space:#x}{ro})"
        )
