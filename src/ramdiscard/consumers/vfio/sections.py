"""The container's per-section records: RDM sections (a RamDiscardListener each) and
plain RAM sections (one mapping each).

Rules (qemu-ram-discard §4.1):

* An :class:`RdmSection` listens to the region's manager for exactly its section, with
  ``double_discard_supported = True``.
* Populate = map in granules: the notified range is cut at every multiple of the
  granularity *in region offsets* and clipped to the section; each piece is one DMA
  mapping (IOVA = address-space offset, host address = RAM base + region offset,
  read-only if the section is) in the container's
  :class:`~ramdiscard.consumers.vfio.mappings.PinnedMappings`, which maps the pieces
  all-or-nothing, so a refused populate leaves nothing of it mapped or pinned and the
  manager rolls back the others.
* Discard = one unmap of the notified range (not validated again: the registered section
  was, and a notified part lies inside it on the manager's granularity); holes are fine,
  so double discards are harmless. A failing unmap is retried once, then logged, never
  raised (a discard cannot be refused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.rdm.listener import RamDiscardListener

if TYPE_CHECKING:
    from ramdiscard.consumers.vfio.mappings import PinnedMappings
    from ramdiscard.memory.section import MemoryRegionSection
    from ramdiscard.rdm.manager import RamDiscardManager

log = logging.getLogger("ramdiscard.consumers.vfio")


class RdmSection(RamDiscardListener):
    """One registered RDM section of a container (QEMU's ``VFIORamDiscardListener``)."""

    double_discard_supported = True

    def __init__(
        self,
        mappings: PinnedMappings,
        rdm: RamDiscardManager,
        section: MemoryRegionSection,
        granularity: int,
        host_base: int,
    ) -> None:
        self.mappings = mappings
        self.rdm = rdm
        self.registered_section = section
        self.granularity = granularity
        self.host_base = host_base

    def __repr__(self) -> str:
        return f"<RdmSection {self.registered_section!r} granularity={self.granularity:#x}>"

    def notify_populate(self, section: MemoryRegionSection) -> None:
        self.mappings.map_granules(section, self.granularity, self.host_base)

    def notify_discard(self, section: MemoryRegionSection) -> None:
        # A failed unpin leaves the rest of the range mapped (PinnedMappings.unmap's contract), so a
        # second attempt finishes the job after a transient failure (EINTR, ENOMEM). If it
        # fails again the stale mapping stays until the next unmap covering it (the next
        # discard of the range, or detach), as in QEMU.
        for attempt in (1, 2):
            try:
                self.mappings.unmap_checked(section.offset_within_address_space, section.size)
                return
            except Exception:
                if attempt == 2:
                    log.exception("vfio: unmap of discarded %r failed; the range stays pinned", section)


@dataclass(frozen=True, slots=True)
class PlainSection:
    """A RAM section mapped whole (no manager, or discards not coordinated)."""

    section: MemoryRegionSection
    host_address: int
