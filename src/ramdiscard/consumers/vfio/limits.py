"""QEMU's DMA-mapping sanity check for RamDiscardManager sections (sans-I/O).

Rule (qemu-ram-discard §4.1, ``vfio_ram_discard_register_listener`` since 10.2): with a
mapping limit L > 0, every RDM section may eventually be mapped granule by granule, so the
worst case needs, per section, its address range rounded outward to the granularity
divided by the granularity. Ordinary RAM may take up to one mapping per KVM memslot, minus
the slots the RDM sections themselves occupy. Registration fails when

    sum(ceil_range(r) / r.granularity) + max_memslots - len(records) > L

The message names the smallest virtio-mem block-size that would pass
(:func:`smallest_granularity`; 256 GiB of hot-pluggable memory needs at least 8 MiB blocks
with the default limit of 65535 and 512 memslots).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ramdiscard.consumers.vfio.errors import DmaLimitError
from ramdiscard.units import MiB, align_down, align_up, format_size


@dataclass(frozen=True, slots=True)
class RdmRange:
    """The address-space range of one registered RDM section and its granularity."""

    address: int
    size: int
    granularity: int


def worst_case_mappings(records: Iterable[RdmRange], max_memslots: int) -> int:
    """The number of DMA mappings QEMU's check assumes the records may need."""
    total = 0
    count = 0
    for r in records:
        start = align_down(r.address, r.granularity)
        end = align_up(r.address + r.size, r.granularity)
        total += (end - start) // r.granularity
        count += 1
    return total + max_memslots - count


def smallest_granularity(
    records: list[RdmRange], max_memslots: int, limit: int, *, minimum: int = MiB
) -> int | None:
    """The smallest power-of-two granularity >= ``minimum`` that, given to every record
    (a record keeps its own granularity when that is larger), makes the check pass;
    None when none does (the memslot reservation alone exceeds ``limit``)."""
    top = max((r.address + r.size for r in records), default=0)
    g = minimum
    while True:
        widened = [RdmRange(r.address, r.size, max(g, r.granularity)) for r in records]
        if worst_case_mappings(widened, max_memslots) <= limit:
            return g
        if g >= top:
            return None  # every record is one granule already: a larger one cannot help
        g <<= 1


def check_dma_limit(records: list[RdmRange], max_memslots: int, limit: int) -> None:
    """Raise DmaLimitError when ``records`` may need more than ``limit`` mappings.

    A limit of 0 means "unknown" (iommufd) and disables the check.
    """
    if limit <= 0:
        return
    needed = worst_case_mappings(records, max_memslots)
    if needed > limit:
        smallest = min((r.granularity for r in records), default=0)
        fits = smallest_granularity(records, max_memslots, limit)
        hint = (
            f"use a virtio-mem block-size of at least {format_size(fits)}"
            if fits is not None
            else "no block-size fits: the memslot reservation alone exceeds the limit"
        )
        raise DmaLimitError(
            f"a vfio container can create up to {limit} DMA mappings, but "
            f"{len(records)} RamDiscardManager section(s) with granularity down to "
            f"{format_size(smallest)} (plus {max_memslots} memslots) may need {needed}; {hint}"
        )
