"""IovaAllocator: ranges of an IOVA window handed out to RAM blocks (sans-I/O).

Rules:

* The window is ``[base, base + size)``. An allocation of ``length`` bytes gets a range
  starting at a multiple of its alignment (the allocator's ``align`` unless the call asks
  for more) and ``align_up(length, align)`` bytes long, so freed ranges stay aligned and
  coalesce.
* First fit: the lowest free range that can hold the aligned allocation is used; the
  alignment gap in front of it stays free.
* :meth:`IovaAllocator.free` returns a range by its start; adjacent free ranges coalesce
  at once, so a freed range is reused by the next allocation that fits.
* Allocated ranges never overlap each other or leave the window. Exhaustion raises
  :class:`~ramdiscard.consumers.blockdma.errors.IovaExhausted`, bad arguments InvalidArgument;
  nothing changes then.

Theory of operation: the free ranges are a sorted list of ``[start, end)`` pairs and the
allocations a dict start -> length. A RAM-block consumer allocates once per block, so
linear first-fit over a handful of free ranges is all it needs.
"""

from __future__ import annotations

from bisect import bisect_left

from ramdiscard.consumers.blockdma.errors import IovaExhausted
from ramdiscard.errors import InvalidArgument
from ramdiscard.units import align_up, format_size, is_power_of_2


class IovaAllocator:
    """First-fit allocator over ``[base, base + size)``; see the module rules."""

    def __init__(self, base: int, size: int, *, align: int = 2 << 20) -> None:
        if not is_power_of_2(align):
            raise InvalidArgument(f"IOVA alignment {align:#x} is not a power of two")
        if base < 0 or size <= 0 or base % align or size % align:
            raise InvalidArgument(
                f"IOVA window [{base:#x}, +{size:#x}) must be non-empty and aligned to {align:#x}"
            )
        self.base = base
        self.size = size
        self.align = align
        self._free: list[tuple[int, int]] = [(base, base + size)]
        self._allocated: dict[int, int] = {}

    def __repr__(self) -> str:
        return f"<IovaAllocator [{self.base:#x}, +{self.size:#x}) free={format_size(self.free_bytes)}>"

    @property
    def free_bytes(self) -> int:
        return sum(end - start for start, end in self._free)

    @property
    def allocated_bytes(self) -> int:
        return sum(self._allocated.values())

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free ``[start, end)`` ranges, ascending, maximal (coalesced)."""
        return list(self._free)

    def allocations(self) -> dict[int, int]:
        """Allocated ranges as start -> length."""
        return dict(self._allocated)

    def alloc(self, length: int, align: int | None = None) -> int:
        """Allocate ``length`` bytes (rounded up to the alignment); return the start.

        ``align`` (a power of two) raises the alignment for this range; it is never lower
        than the allocator's. Raises InvalidArgument for a non-positive length or a bad
        alignment, IovaExhausted when no free range fits.
        """
        if align is None:
            align = self.align
        if not is_power_of_2(align):
            raise InvalidArgument(f"IOVA alignment {align:#x} is not a power of two")
        align = max(align, self.align)
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise InvalidArgument(f"IOVA allocation length must be a positive int, got {length!r}")
        length = align_up(length, align)
        for i, (start, end) in enumerate(self._free):
            at = align_up(start, align)
            if at + length <= end:
                pieces = [(s, e) for s, e in ((start, at), (at + length, end)) if e > s]
                self._free[i : i + 1] = pieces
                self._allocated[at] = length
                return at
        raise IovaExhausted(
            f"IOVA window [{self.base:#x}, +{self.size:#x}) has no free range of "
            f"{format_size(length)} aligned to {format_size(align)} "
            f"({format_size(self.free_bytes)} free in {len(self._free)} ranges)"
        )

    def free(self, start: int) -> None:
        """Return the range allocated at ``start``; InvalidArgument if there is none."""
        length = self._allocated.pop(start, None)
        if length is None:
            raise InvalidArgument(f"no IOVA range is allocated at {start:#x}")
        end = start + length
        i = bisect_left(self._free, (start, end))
        if i < len(self._free) and self._free[i][0] == end:
            end = self._free.pop(i)[1]
        if i and self._free[i - 1][1] == start:
            start = self._free.pop(i - 1)[0]
            i -= 1
        self._free.insert(i, (start, end))
