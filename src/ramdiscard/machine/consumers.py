"""Consumers of guest memory attached to a machine's address space: vfio-style DMA and KVM.

Rules:

* A consumer is a :class:`~ramdiscard.memory.MemoryListener` on the machine's address
  space. It sees every RAM section; :meth:`Consumer.close` unregisters it, which releases
  everything it holds (pins, mappings, memslots). ``close`` is idempotent and never raises.
* :class:`VfioConsumer` follows qemu-ram-discard §4.1 (type1 container). A section whose
  region has a RamDiscardManager, with ``coordinate_discards``: one RamDiscardListener per
  section; populate maps (pins) every granule separately, discard unmaps the range in one
  call (holes allowed: double discard is supported). A refused or failing map undoes what
  it mapped for the notification and raises, so the provider rolls back and the guest gets
  BUSY. Without a manager, or without ``coordinate_discards`` (a VMM that ignores the
  manager), a section is mapped whole: its memory is pinned for the machine's lifetime and
  discards free nothing (the pin goes stale).
* The mapping count never exceeds ``dma_limit`` (the kernel's ``dma_entry_limit``: a map
  beyond it fails with ENOSPC). After registering a managed section the container checks,
  as QEMU 10.2 does, that the worst case (every granule of every managed section mapped,
  plus ``max_memslots`` for ordinary RAM) fits the limit, and raises
  :class:`DmaLimitExceeded` naming a block size that would fit.
* With ``coordinate_discards`` the consumer holds the "uncoordinated discards disabled"
  count of the machine's DiscardPolicy while attached (vfio type1 / iommufd).
* :class:`KvmConsumer` creates one KVM memslot per RAM section (region_add) and deletes it
  at region_del, on a real ``/dev/kvm`` VM when available (``mode`` "kvm"/"auto"), else as
  bookkeeping only ("model").
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass

from ramdiscard.dma import DmaBackend, NullDmaBackend, PinHandle
from ramdiscard.errors import HostMemoryError, RamDiscardError
from ramdiscard.kvm import KvmVm
from ramdiscard.memory.address_space import AddressSpace, MemoryListener
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.rdm.policy import DiscardPolicy
from ramdiscard.units import format_size

log = logging.getLogger("ramdiscard.machine")

KVM_MEMSLOTS_FALLBACK = 512
"""QEMU's max_memslots when KVM is not in use."""


class DmaLimitExceeded(RamDiscardError):
    """More DMA mappings than the container's limit would be needed."""


@dataclass
class _Mapping:
    size: int
    handle: PinHandle
    section: MemoryRegionSection | None = None


def _host_address(section: MemoryRegionSection) -> int:
    ram = section.mr.ram
    assert ram is not None
    return int(ram.host_address) + section.offset_within_region


class Consumer(MemoryListener):
    """Base of the machine's consumers: an id, attach/close and counters."""

    kind = "consumer"

    def __init__(self, id: str) -> None:
        self.id = id
        self._space: AddressSpace | None = None

    def attach(self, space: AddressSpace) -> None:
        space.register_listener(self)
        self._space = space

    def close(self) -> None:
        space, self._space = self._space, None
        if space is not None:
            try:
                space.unregister_listener(self)
            except Exception:  # teardown must go on; the error is logged
                log.exception("%s: unregister failed", self.id)

    def status(self) -> dict[str, object]:
        return {"id": self.id, "type": self.kind}


class _RdmRecord(RamDiscardListener):
    """vfio's per-section RamDiscardListener (QEMU's VFIORamDiscardListener)."""

    double_discard_supported = True

    def __init__(self, owner: VfioConsumer, section: MemoryRegionSection, granularity: int) -> None:
        self.owner = owner
        self.registered = section
        self.granularity = granularity

    def _iova(self, section: MemoryRegionSection, region_offset: int) -> int:
        return section.offset_within_address_space + (region_offset - section.offset_within_region)

    def notify_populate(self, section: MemoryRegionSection) -> None:
        g = self.granularity
        start = section.offset_within_region
        end = section.end
        host = _host_address(section) - start
        try:
            pos = start
            while pos < end:
                stop = min(end, (pos // g + 1) * g)
                self.owner.dma_map(self._iova(section, pos), host + pos, stop - pos)
                pos = stop
        except BaseException:
            self.notify_discard(section)
            raise

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.owner.dma_unmap_range(self._iova(section, section.offset_within_region), section.size)


class VfioConsumer(Consumer):
    """A vfio type1 container model pinning through ``backend``; see the module rules.

    The consumer owns ``backend`` and closes it in :meth:`close`.
    """

    kind = "vfio"

    def __init__(
        self,
        id: str,
        backend: DmaBackend,
        *,
        coordinate_discards: bool = True,
        dma_limit: int = 65535,
        max_memslots: int = KVM_MEMSLOTS_FALLBACK,
        policy: DiscardPolicy | None = None,
        check_worst_case: bool = True,
    ) -> None:
        super().__init__(id)
        self.check_worst_case = check_worst_case
        self.backend = backend
        self.coordinate_discards = coordinate_discards
        self.dma_limit = dma_limit
        self.max_memslots = max_memslots
        self._policy = policy
        self._policy_held = False
        self._maps: dict[int, _Mapping] = {}
        self._granules: dict[int, int] = {}  # iova -> granularity for RDM ranges (for unmap walks)
        self._records: list[_RdmRecord] = []
        self._whole: dict[tuple[int, int], _Mapping] = {}
        self.peak_mappings = 0
        self.peak_pinned = 0
        self.refused_maps = 0

    # -- lifetime -----------------------------------------------------------------------

    def attach(self, space: AddressSpace) -> None:
        if self.coordinate_discards and self._policy is not None:
            self._policy.uncoordinated_disable(True)
            self._policy_held = True
        try:
            super().attach(space)
        except BaseException:
            self._release_policy()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            for rec in list(self._records):
                mgr = rec.manager
                if mgr is not None:
                    with contextlib.suppress(Exception):
                        mgr.unregister_listener(rec)
            self._records.clear()
            for m in list(self._maps.values()) + list(self._whole.values()):
                with contextlib.suppress(Exception):
                    self.backend.unpin(m.handle)
            self._maps.clear()
            self._whole.clear()
            self.backend.close()
            self._release_policy()

    def _release_policy(self) -> None:
        if self._policy_held and self._policy is not None:
            self._policy.uncoordinated_disable(False)
            self._policy_held = False

    # -- MemoryListener -----------------------------------------------------------------

    def region_add(self, section: MemoryRegionSection) -> None:
        mr = section.mr
        if not mr.is_ram or mr.ram is None or section.size == 0:
            return
        rdm = mr.ram_discard_manager
        if rdm is not None and self.coordinate_discards:
            g = rdm.get_min_granularity(mr)
            rec = _RdmRecord(self, section, g)
            rdm.register_listener(rec, section)
            self._records.insert(0, rec)
            if self.check_worst_case:
                self._check_limit()
            return
        handle = self.backend.pin(_host_address(section), section.size)
        self._whole[(section.offset_within_address_space, section.size)] = _Mapping(
            section.size, handle, section
        )
        self._note_peaks()

    def region_del(self, section: MemoryRegionSection) -> None:
        for rec in self._records:
            if rec.registered == section:
                self._records.remove(rec)
                mgr = rec.manager
                if mgr is not None:
                    mgr.unregister_listener(rec)
                return
        m = self._whole.pop((section.offset_within_address_space, section.size), None)
        if m is not None:
            self.backend.unpin(m.handle)

    # -- mappings -----------------------------------------------------------------------

    def dma_map(self, iova: int, host_address: int, size: int) -> None:
        """Map (pin) one granule. Raises HostMemoryError(ENOSPC) beyond the limit."""
        if self.mapping_count >= self.dma_limit:
            self.refused_maps += 1
            raise HostMemoryError(
                errno.ENOSPC, f"{self.id}: DMA mapping limit {self.dma_limit} reached (VFIO_IOMMU_MAP_DMA)"
            )
        handle = self.backend.pin(host_address, size)
        self._maps[iova] = _Mapping(size, handle)
        self._note_peaks()

    def dma_unmap_range(self, iova: int, size: int) -> None:
        """Unmap every mapping that starts inside ``[iova, +size)`` (holes allowed)."""
        end = iova + size
        maps = self._maps
        # Mappings start on granule boundaries: walk the range at the smallest granularity
        # when that is shorter than scanning every mapping.
        step = min((r.granularity for r in self._records), default=4096)
        if size // step < len(maps):
            keys = [a for a in range(iova - iova % step, end, step) if a in maps and a >= iova]
        else:
            keys = [a for a in maps if iova <= a < end]
        for a in keys:
            m = maps.pop(a)
            try:
                self.backend.unpin(m.handle)
            except Exception:  # vfio only logs unmap errors
                log.exception("%s: unmap of %#x failed", self.id, a)

    def _note_peaks(self) -> None:
        self.peak_mappings = max(self.peak_mappings, self.mapping_count)
        self.peak_pinned = max(self.peak_pinned, self.backend.pinned_bytes)

    @property
    def mapping_count(self) -> int:
        return len(self._maps) + len(self._whole)

    def worst_case_mappings(self) -> int:
        """QEMU's check: every granule of every managed section, plus max_memslots for the
        rest, minus one per managed section."""
        total = 0
        for rec in self._records:
            s, g = rec.registered, rec.granularity
            start = s.offset_within_address_space // g * g
            end = -(-s.address_end // g) * g
            total += (end - start) // g
        return total + self.max_memslots - len(self._records)

    def _check_limit(self) -> None:
        need = self.worst_case_mappings()
        if need > self.dma_limit:
            managed = sum(r.registered.size for r in self._records)
            room = self.dma_limit - self.max_memslots + len(self._records)
            hint = ""
            if room > 0:
                bs = 1 << 20
                while managed // bs > room:
                    bs <<= 1
                hint = f"; use a block-size of at least {format_size(bs)}"
            else:
                hint = "; no block size fits: the limit is below the memslot reservation"
            raise DmaLimitExceeded(
                f"{self.id}: {format_size(managed)} of managed memory needs up to {need} DMA mappings "
                f"(incl. {self.max_memslots} for memslots), above the limit of {self.dma_limit}{hint}"
            )

    def stale_pinned_bytes(self) -> int:
        """Bytes pinned by whole-section mappings that are no longer resident: memory the
        guest gave back (discarded) but the pin still holds. Granule mappings of managed
        sections are unmapped before they could go stale, so they never count."""
        stale = 0
        if isinstance(self.backend, NullDmaBackend):
            return 0  # nothing is really held
        for m in self._whole.values():
            s = m.section
            ram = s.mr.ram if s is not None else None
            resident = getattr(ram, "resident_bytes", None)
            if s is None or resident is None:
                continue
            stale += max(0, m.size - int(resident(s.offset_within_region, s.size)))
        return stale

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.kind,
            "backend": type(self.backend).__name__,
            "coordinate_discards": self.coordinate_discards,
            "dma_mappings": self.mapping_count,
            "peak_dma_mappings": self.peak_mappings,
            "dma_limit": self.dma_limit,
            "worst_case_mappings": self.worst_case_mappings(),
            "pinned_bytes": self.backend.pinned_bytes,
            "stale_pinned_bytes": self.stale_pinned_bytes(),
            "peak_pinned_bytes": self.peak_pinned,
            "refused_maps": self.refused_maps,
        }


class KvmConsumer(Consumer):
    """One KVM memslot per RAM section; see the module rules. ``vm`` None = model only."""

    kind = "kvm"

    def __init__(self, id: str, vm: KvmVm | None, *, nr_memslots: int = 32764) -> None:
        super().__init__(id)
        self.vm = vm
        self.nr_memslots = nr_memslots
        self._slots: dict[tuple[int, int], int] = {}
        self._free: list[int] = []
        self._next = 0
        self.peak_memslots = 0
        self.created = 0
        self.deleted = 0

    def region_add(self, section: MemoryRegionSection) -> None:
        mr = section.mr
        if not mr.is_ram or mr.ram is None or section.size == 0:
            return
        if self._free:
            slot = min(self._free)
            self._free.remove(slot)
        else:
            if self._next >= self.nr_memslots:
                raise HostMemoryError(errno.ENOSPC, f"{self.id}: all {self.nr_memslots} KVM memslots in use")
            slot = self._next
            self._next += 1
        try:
            if self.vm is not None:
                self.vm.set_user_memory_region(
                    slot, section.offset_within_address_space, section.size, _host_address(section)
                )
        except BaseException:
            self._free.append(slot)
            raise
        self._slots[(section.offset_within_address_space, section.size)] = slot
        self.created += 1
        self.peak_memslots = max(self.peak_memslots, len(self._slots))

    def region_del(self, section: MemoryRegionSection) -> None:
        slot = self._slots.pop((section.offset_within_address_space, section.size), None)
        if slot is None:
            return
        if self.vm is not None:
            try:
                self.vm.delete_memory_region(slot)
            except Exception:
                log.exception("%s: deleting memslot %d failed", self.id, slot)
        self._free.append(slot)
        self.deleted += 1

    @property
    def memslots(self) -> int:
        return len(self._slots)

    def close(self) -> None:
        try:
            super().close()
        finally:
            if self.vm is not None:
                with contextlib.suppress(Exception):
                    self.vm.close()
                self.vm = None

    def status(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.kind,
            "real_kvm": self.vm is not None,
            "memslots": self.memslots,
            "peak_memslots": self.peak_memslots,
            "memslots_created": self.created,
            "memslots_deleted": self.deleted,
        }
