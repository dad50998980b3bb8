"""The guest-physical block list: which guest memory a dump contains.

Rules (qemu-ram-discard §4.3, QEMU's ``system/memory_mapping.c``):

* Built from the address space's flat view. Only RAM sections count (RAM-backed ROM
  included, as in QEMU).
* A section whose region has a RamDiscardManager contributes only its populated runs,
  found with ``replay_populated``: discarded memory is never listed, so a dump never
  reads it (reading could populate it) and never contains it.
* A block is extended by the next run only if that run is in the *same* memory region and
  contiguous in both guest-physical address and region offset; ranges are never merged
  across memory regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection


@dataclass(slots=True)
class GuestPhysBlock:
    """``size`` bytes of ``mr`` at region offset ``offset``, seen at guest-physical ``gpa``."""

    gpa: int
    size: int
    mr: MemoryRegion
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def guest_phys_blocks(address_space: AddressSpace) -> list[GuestPhysBlock]:
    """The populated guest memory of ``address_space``, ascending by address (rules above)."""
    blocks: list[GuestPhysBlock] = []

    def add(section: MemoryRegionSection) -> None:
        if section.size == 0:
            return
        if blocks:
            last = blocks[-1]
            if (
                last.mr is section.mr
                and last.end == section.offset_within_address_space
                and last.offset + last.size == section.offset_within_region
            ):
                last.size += section.size
                return
        blocks.append(
            GuestPhysBlock(
                section.offset_within_address_space, section.size, section.mr, section.offset_within_region
            )
        )

    for section in address_space.flatview():
        mr = section.mr
        if not mr.is_ram or mr.ram is None:
            continue
        rdm = mr.ram_discard_manager
        if rdm is None:
            add(section)
        else:
            rdm.replay_populated(section, add)
    return blocks
