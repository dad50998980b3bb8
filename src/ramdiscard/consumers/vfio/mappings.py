"""A container's DMA mappings: the type1-v2 mapping table with one real pin per mapping.

Rules:

* Mappings follow the type1 v2 IOMMU (see :mod:`ramdiscard.consumers.vfio.table`): no
  overlaps (MappingConflict), an unmap removes whole mappings and may cover holes but
  never cuts one (UnmapSplitError), at most ``max_mappings`` mappings (MappingLimitError).
  IOVA, host address and size are multiples of :data:`IOMMU_PAGE_SIZE`; sizes are
  positive. Every argument error (InvalidArgument) is raised before any effect.
* Every mapping holds a pin through the DMA backend from map to unmap. A map whose pin
  fails maps nothing; :meth:`PinnedMappings.map_granules` maps all of its granules or
  none of them.
* An unpin failure during an unmap removes the mappings before the failing one; the rest
  stay mapped and pinned and the backend's error propagates.
* Statistics: ``peak_mapping_count`` and ``peak_mapped_bytes`` (highest values since
  construction) and ``refused_maps`` (maps refused by the mapping limit).
* Locking: every method runs under :attr:`PinnedMappings.lock` (re-entrant), which the
  owning container also uses for its own records.

This is the home of what both the container's type1 interface and its RDM section
listeners (:mod:`ramdiscard.consumers.vfio.sections`) do to the table.

Theory of operation: each map call pins its mappings as one run pin
(:mod:`ramdiscard.consumers.dma.runs`; a backend that is not a DmaBackend gets the
generic form over ``pin_many``), and every table entry it made carries the same record
(the run and the IOVAs of its pieces), so mapping ``iova`` is piece
``bisect(iovas, iova)``. An unmap releases each stretch of entries of one record with
one ``unpin_run``; after a failure the released prefix is found by ``run_holds``.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Sequence
from itertools import repeat
from operator import add
from typing import NamedTuple

from ramdiscard.consumers.dma.backend import PAGE_SIZE, DmaBackend, PinHandle
from ramdiscard.consumers.dma.granules import granule_starts
from ramdiscard.consumers.dma.runs import (
    PinRun,
    generic_pin_run,
    generic_run_handle,
    generic_run_holds,
    generic_unpin_run,
)
from ramdiscard.consumers.vfio.errors import MappingLimitError
from ramdiscard.consumers.vfio.table import MappingTable
from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import DmaPinner
from ramdiscard.memory.section import MemoryRegionSection

IOMMU_PAGE_SIZE = PAGE_SIZE
_new = object.__new__


class DmaMapping(NamedTuple):
    """One DMA mapping of a container."""

    iova: int
    size: int
    host_address: int
    readonly: bool


class _Mapped:
    """What one map call made: its pin run (piece ``i`` is the mapping at ``iovas[i]``)
    and whether it is read-only. Every mapping of it in the table has it as payload."""

    __slots__ = ("iovas", "pin", "readonly")

    def __init__(self, pin: PinRun, iovas: list[int], readonly: bool) -> None:
        self.pin = pin
        self.iovas = iovas
        self.readonly = readonly

    def piece(self, iova: int) -> int:
        return bisect_left(self.iovas, iova)


def check_ints(**values: int) -> None:
    """InvalidArgument unless every value is an int (bool refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")


class PinnedMappings:
    """Pinned type1-v2 mappings over ``backend``, at most ``max_mappings``; see the module
    rules. Does not own ``backend``."""

    def __init__(self, backend: DmaPinner, max_mappings: int) -> None:
        self.backend = backend
        self.lock = threading.RLock()
        self.peak_mapping_count = 0
        self.peak_mapped_bytes = 0
        self.refused_maps = 0
        self._table: MappingTable[_Mapped] = MappingTable(max_mappings)
        if isinstance(backend, DmaBackend):
            self._pin_run, self._unpin_run = backend.pin_run, backend.unpin_run
            self._pin_checked = backend.pin_run_checked
            self._run_holds, self._run_handle = backend.run_holds, backend.run_handle
        else:
            self._pin_run = lambda ranges: generic_pin_run(backend, ranges)
            self._pin_checked = self._pin_run
            self._unpin_run = lambda run, lo, hi: generic_unpin_run(backend, run, lo, hi)
            self._run_holds = lambda run, i: generic_run_holds(backend, run, i)
            self._run_handle = lambda run, i: generic_run_handle(backend, run, i)

    @property
    def count(self) -> int:
        return len(self._table)

    @property
    def mapped_bytes(self) -> int:
        return self._table.mapped_bytes

    def mappings(self) -> list[DmaMapping]:
        """Every mapping, in IOVA order."""
        with self.lock:
            out: list[DmaMapping] = []
            for iova, m in self._table.items():
                i = m.piece(iova)
                host_address, size = m.pin.ranges[i]
                out.append(DmaMapping(iova, size, host_address, m.readonly))
            return out

    def pin_of(self, iova: int) -> PinHandle:
        """The pin of the mapping containing ``iova``; InvalidArgument if nothing is
        mapped there."""
        with self.lock:
            index = self._table.find(iova)
            if index is None:
                raise InvalidArgument(f"nothing is mapped at IOVA {iova:#x}")
            m = self._table.payload_at(index)
            return self._run_handle(m.pin, m.piece(self._table.start_at(index)))

    def map(self, iova: int, host_address: int, size: int, readonly: bool) -> None:
        """Map and pin ``[host_address, +size)`` at ``iova`` (arguments checked first)."""
        check_ints(iova=iova, host_address=host_address, size=size)
        check_range("map", iova, size)
        if host_address <= 0 or host_address % IOMMU_PAGE_SIZE:
            raise InvalidArgument(f"DMA map host address {host_address:#x} is not page aligned")
        with self.lock:
            index = self._check_map(iova, iova + size, 1)
            run = self._pin_run(((host_address, size),))
            self._table.insert_run(index, [iova], [iova + size], [_Mapped(run, [iova], readonly)])
            self._note_peaks()

    def map_granules(self, section: MemoryRegionSection, granularity: int, host_base: int) -> None:
        """Map ``section`` cut at multiples of ``granularity`` in region offsets
        (:func:`~ramdiscard.consumers.dma.granules.granule_starts`), host address
        ``host_base`` + region offset, all or nothing (a refused populate leaves nothing
        mapped or pinned). The section's geometry was checked when it was registered."""
        start = section.offset_within_region
        end = start + section.size
        to_iova = section.offset_within_address_space - start
        iovas, sizes = granule_starts(start, end, granularity, to_iova)
        if not iovas:
            return
        with self.lock:
            table = self._table
            iova_end = end + to_iova
            try:  # _check_map() inline (the request path)
                index = table.check_map(iovas[0], iova_end, len(iovas))
            except MappingLimitError:
                self.refused_maps += 1
                raise
            # map() and zip() loops run in C: no Python frame per granule; the pieces tile
            # the range, so each mapping's end is the next one's start (the same int). The
            # pieces come from a registered section of a mapped RAM block: page-aligned,
            # positive, inside the block, which is what pin_run_checked requires.
            pieces = list(zip(map(add, iovas, repeat(host_base - to_iova)), sizes, strict=True))
            run = self._pin_checked(pieces)
            ends = iovas[1:]
            ends.append(iova_end)
            record = _new(_Mapped)  # _Mapped(run, iovas, readonly) without an __init__ frame
            record.pin, record.iovas, record.readonly = run, iovas, section.readonly
            table.insert_run(index, iovas, ends, [record] * len(iovas))
            count = len(table)
            if count > self.peak_mapping_count:  # _note_peaks() inline
                self.peak_mapping_count = count
            if table.mapped_bytes > self.peak_mapped_bytes:
                self.peak_mapped_bytes = table.mapped_bytes

    def unmap(self, iova: int, size: int) -> int:
        """Unmap and unpin every mapping inside ``[iova, +size)``; the bytes unmapped (see
        the module rules for a failing unpin)."""
        check_ints(iova=iova, size=size)
        check_range("unmap", iova, size)
        return self.unmap_checked(iova, size)

    def unmap_checked(self, iova: int, size: int) -> int:
        """:meth:`unmap` of a range known to be valid: a positive, page-aligned range of
        ints inside the 64-bit IOVA space (a discard notification's part of a section
        that was checked when it was registered). The arguments are not checked again."""
        with self.lock:
            table = self._table
            lo, hi = table.unmap_span(iova, iova + size)
            if lo == hi:
                return 0
            starts, entries = table.span(lo, hi)
            try:
                m = entries[0]
                if m is entries[-1] and entries.count(m) == len(entries):
                    # One map call's mappings (the usual discard): _release() inline.
                    iovas = m.iovas
                    self._unpin_run(m.pin, bisect_left(iovas, starts[0]), bisect_left(iovas, starts[-1]) + 1)
                else:
                    self._release(entries, starts)
            except BaseException:
                released = 0
                for iova, m in zip(starts, entries, strict=True):
                    if self._run_holds(m.pin, m.piece(iova)):
                        break
                    released += 1
                table.remove(lo, lo + released)
                raise
            return table.remove(lo, hi)

    def _release(self, entries: Sequence[_Mapped], starts: Sequence[int]) -> None:
        """Unpin the mappings at ``starts`` (payloads ``entries``): one ``unpin_run`` per
        stretch of mappings made by the same map call (usually one)."""
        n = len(entries)
        i = 0
        while i < n:
            m = entries[i]
            j = n if (i == 0 and entries[-1] is m and entries.count(m) == n) else i + 1
            while j < n and entries[j] is m:
                j += 1
            iovas = m.iovas  # m.piece() inline, twice
            self._unpin_run(m.pin, bisect_left(iovas, starts[i]), bisect_left(iovas, starts[j - 1]) + 1)
            i = j

    def unmap_all(self) -> int:
        """Unmap every mapping; the bytes unmapped."""
        with self.lock:
            extent = self._table.extent()
            if extent is None:
                return 0
            first, end = extent
            return self.unmap(first, end - first)

    def _check_map(self, iova: int, end: int, count: int) -> int:
        try:
            return self._table.check_map(iova, end, count)
        except MappingLimitError:
            self.refused_maps += 1
            raise

    def _note_peaks(self) -> None:
        table = self._table
        if len(table) > self.peak_mapping_count:
            self.peak_mapping_count = len(table)
        if table.mapped_bytes > self.peak_mapped_bytes:
            self.peak_mapped_bytes = table.mapped_bytes


def check_range(what: str, iova: int, size: int) -> None:
    """InvalidArgument unless ``[iova, +size)`` is a positive, IOMMU-page-aligned range
    inside the 64-bit IOVA space."""
    if size <= 0:
        raise InvalidArgument(f"DMA {what} size must be positive, got {size:#x}")
    if iova < 0 or iova % IOMMU_PAGE_SIZE or size % IOMMU_PAGE_SIZE:
        raise InvalidArgument(
            f"DMA {what} [{iova:#x}, +{size:#x}) is not aligned to the IOMMU page size {IOMMU_PAGE_SIZE:#x}"
        )
    if iova + size > 1 << 64:
        raise InvalidArgument(f"DMA {what} [{iova:#x}, +{size:#x}) overflows 64 bits")
