"""VfioContainer: a vfio type1-v2 style DMA container that pins only populated memory.

Rules:

* Mappings follow the type1 v2 IOMMU and each holds a real pin through the
  ``ramdiscard.consumers.dma`` backend from map to unmap
  (:mod:`ramdiscard.consumers.vfio.mappings`): no overlaps (EEXIST), an unmap removes
  whole mappings and may cover holes but never cuts one (EINVAL), at most
  ``max_mappings`` mappings (ENOSPC), IOVA, host address and size multiples of the IOMMU
  page size (4 KiB). Every argument error is raised before any effect; a map whose pin
  fails maps nothing.
* As a :class:`~ramdiscard.memory.MemoryListener` attached to one address space
  (:meth:`VfioContainer.attach`):

  - a RAM section whose region has no RamDiscardManager is mapped whole;
  - with ``coordinate_discards=True`` (the default) a section whose region has a manager
    gets an :class:`~ramdiscard.consumers.vfio.sections.RdmSection` listener instead, so only
    populated memory is mapped and pinned (granule by granule), and discarded memory is
    unmapped before anyone relies on it being freed;
  - with ``coordinate_discards=False`` such sections are mapped and pinned whole, as
    before the RamDiscardManager existed: all of the region stays pinned, and memory the
    provider discards stays pinned and stale.

* Discard policy (qemu-ram-discard §3.7): attaching takes the uncoordinated-disable count
  (a balloon-style discarder is refused while attached), or with
  ``coordinate_discards=False`` the full disable count (then virtio-mem, which requires
  coordinated discards, conflicts, as with QEMU's sPAPR IOMMU or nvme://). Detaching
  releases it.
* DMA-mapping limit (qemu-ram-discard §4.1): before an RDM section is registered, QEMU
  10.2's worst-case check runs over all RDM sections including the new one
  (:mod:`ramdiscard.consumers.vfio.limits`). *Unlike QEMU*, a failing section is never registered,
  so nothing of it stays registered or pinned. ``dma_limit_check=False`` skips the check
  (QEMU before 10.2): the limit then shows at run time, when a populate needs more
  mappings than are left and is refused with MappingLimitError (virtio-mem answers BUSY).
* Statistics, for reports: ``peak_mapping_count`` and ``peak_mapped_bytes`` (highest
  values since construction) and ``refused_maps`` (maps refused by the limit).
* Failures during :meth:`attach` leave nothing attached, mapped, pinned or held. During a
  later topology change a refused section is simply not mapped (the address space reports
  the error as a TopologyError).
* vIOMMU (:meth:`iommu_map`): a translated mapping into a region with a manager is refused
  unless the target is fully populated; an allowed one warns once per container, since a
  guest can keep it pinned across a later unplug.

Theory of operation: the mapping table is sorted by IOVA and bisected
(:class:`~ramdiscard.consumers.vfio.table.MappingTable`); a populate notification computes all
granules of the notified range at once, checks the whole run against the table once,
pins it as one run pin (:meth:`~ramdiscard.consumers.dma.DmaBackend.pin_run`: one pin per
granule, one record per run) and inserts it with one slice assignment; an unmap releases
each stretch of one run with one ``unpin_run`` (io_uring: one ``BUFFERS_UPDATE`` per run
of slots), so the per-granule Python work is a few list operations around the syscalls
(:meth:`~ramdiscard.consumers.vfio.mappings.PinnedMappings.map_granules`).
Locking: one re-entrant lock per container (the mappings' lock) around the table, the
section records and the backend calls; notifications arrive with the manager's lock
held. Lock order is topology lock, then manager lock, then container lock: the container
never calls into the address space or a manager while holding its own lock
(attach/detach/region_add/region_del run under the topology lock, which serializes
them), otherwise a plug notifying the container while it registers with the manager
deadlocks.
"""

from __future__ import annotations

import threading
import warnings

from ramdiscard.consumers.dma.backend import PinHandle
from ramdiscard.consumers.vfio.errors import ContainerStateError, IommuMapRefused
from ramdiscard.consumers.vfio.limits import RdmRange, check_dma_limit, worst_case_mappings
from ramdiscard.consumers.vfio.mappings import IOMMU_PAGE_SIZE, DmaMapping, PinnedMappings, check_ints
from ramdiscard.consumers.vfio.sections import PlainSection, RdmSection
from ramdiscard.errors import InvalidArgument, ListenerError
from ramdiscard.interfaces import DmaPinner
from ramdiscard.memory.address_space import AddressSpace, MemoryListener
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.memory.system import default_system
from ramdiscard.rdm.manager import manager_of
from ramdiscard.rdm.policy import DiscardPolicy, default_policy, policy_of
from ramdiscard.units import is_power_of_2

DEFAULT_MAX_MAPPINGS = 65535
"""The kernel's default ``vfio_iommu_type1.dma_entry_limit``."""


class IommuPinWarning(UserWarning):
    """A vIOMMU mapping pinned RDM-managed memory that a guest may keep across unplug."""


_SectionKey = tuple[int, int]


class VfioContainer(MemoryListener):
    """A type1-v2 DMA container over ``backend``; see the module rules.

    ``max_mappings`` is the container's DMA-mapping limit (the kernel's ``dma_entry_limit``,
    also used by the DMA-limit check); ``max_memslots`` is the memslot count that check
    assumes (the KVM limit in QEMU when KVM is used, else 512); ``dma_limit_check`` False
    skips that check. ``policy`` defaults to the policy of the memory system of the address
    space the container attaches to. The container does not own ``backend``.
    """

    def __init__(
        self,
        backend: DmaPinner,
        *,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        coordinate_discards: bool = True,
        policy: DiscardPolicy | None = None,
        max_memslots: int = 512,
        dma_limit_check: bool = True,
    ) -> None:
        if not isinstance(backend, DmaPinner):
            raise InvalidArgument(f"backend must be a DMA backend (DmaPinner), not {type(backend).__name__}")
        check_ints(max_mappings=max_mappings, max_memslots=max_memslots)
        if max_mappings <= 0:
            raise InvalidArgument(f"max_mappings must be positive, got {max_mappings}")
        if max_memslots < 0:
            raise InvalidArgument(f"max_memslots must not be negative, got {max_memslots}")
        self.backend = backend
        self.max_mappings = max_mappings
        self.max_memslots = max_memslots
        self.coordinate_discards = coordinate_discards
        self.dma_limit_check = dma_limit_check
        self._policy = policy
        self._held_policy: DiscardPolicy | None = None
        self._maps = PinnedMappings(backend, max_mappings)
        self._lock = self._maps.lock
        self._space: AddressSpace | None = None
        self._rdm_sections: dict[_SectionKey, RdmSection] = {}
        self._plain_sections: dict[_SectionKey, PlainSection] = {}
        self._iommu_warned = False

    @property
    def policy(self) -> DiscardPolicy:
        """The policy the container holds its count on: the one given, else the policy of
        the attached address space's memory system (the default policy while detached)."""
        if self._policy is not None:
            return self._policy
        return policy_of(self._space.system) if self._space is not None else default_policy()

    def _system_lock(self) -> threading.RLock:
        space = self._space
        return space.system.lock if space is not None else default_system().lock

    def __repr__(self) -> str:
        where = f" attached to {self._space.name!r}" if self._space is not None else ""
        return f"<VfioContainer {self._maps.count} mappings{where}>"

    # -- the type1 v2 interface ---------------------------------------------------------

    @property
    def mapping_count(self) -> int:
        return self._maps.count

    @property
    def mapped_bytes(self) -> int:
        return self._maps.mapped_bytes

    @property
    def peak_mapping_count(self) -> int:
        """The highest mapping count since construction."""
        return self._maps.peak_mapping_count

    @property
    def peak_mapped_bytes(self) -> int:
        """The highest mapped byte count since construction."""
        return self._maps.peak_mapped_bytes

    @property
    def refused_maps(self) -> int:
        """Maps refused by the mapping limit since construction."""
        return self._maps.refused_maps

    def mappings(self) -> list[DmaMapping]:
        """Every mapping, in IOVA order."""
        return self._maps.mappings()

    def pin_of(self, iova: int) -> PinHandle:
        """The backend pin of the mapping containing ``iova`` (e.g. for ``dma_read``);
        InvalidArgument if nothing is mapped there."""
        return self._maps.pin_of(iova)

    def dma_map(self, iova: int, host_address: int, size: int, readonly: bool = False) -> None:
        """Map and pin ``[host_address, +size)`` at ``iova``.

        Raises InvalidArgument (alignment, size), MappingConflict (overlap),
        MappingLimitError (table full) before any effect, or the backend's error when the
        pin fails; nothing is mapped or pinned then.
        """
        self._maps.map(iova, host_address, size, readonly)

    def dma_unmap(self, iova: int, size: int) -> int:
        """Unmap (and unpin) every mapping inside ``[iova, +size)``; return the bytes unmapped.

        Holes are fine; an empty range returns 0. Raises InvalidArgument (alignment, size)
        or UnmapSplitError (the range would cut a mapping) with nothing removed. If the
        backend fails to unpin, the mappings before the failing one are removed, the rest
        stay mapped and pinned, and the error propagates.
        """
        return self._maps.unmap(iova, size)

    def unmap_all(self) -> int:
        """Unmap every mapping (listener-made ones included); return the bytes unmapped."""
        return self._maps.unmap_all()

    # -- vIOMMU -------------------------------------------------------------------------

    def iommu_map(self, iova: int, section: MemoryRegionSection) -> None:
        """Map a vIOMMU translation: ``section`` (guest RAM the guest IOMMU points at) at
        ``iova``.

        If the section's region has a RamDiscardManager and the section is not fully
        populated, raise IommuMapRefused and pin nothing. Otherwise map it like
        :meth:`dma_map`; the first such mapping of populated managed memory warns
        (IommuPinWarning) that the guest can keep it pinned after an unplug.
        """
        mr = section.mr
        host = self._host_base(mr)
        rdm = manager_of(mr)
        if rdm is None:
            self.dma_map(iova, host + section.offset_within_region, section.size, section.readonly)
            return
        with rdm.lock:
            if section.size == 0 or not rdm.is_populated(section):
                raise IommuMapRefused(
                    f"iommu map to discarded memory (e.g., unplugged via virtio-mem): "
                    f"IOVA {iova:#x} -> {section!r} is not fully populated; nothing pinned"
                )
            self.dma_map(iova, host + section.offset_within_region, section.size, section.readonly)
        if not self._iommu_warned:
            self._iommu_warned = True
            warnings.warn(
                "vfio: mapping populated memory of a RamDiscardManager through a vIOMMU; "
                "a malicious guest can keep such mappings across a later unplug and so pin "
                "more memory than intended (mitigate with RLIMIT_MEMLOCK)",
                IommuPinWarning,
                stacklevel=2,
            )

    def iommu_unmap(self, iova: int, size: int) -> int:
        """Remove vIOMMU mappings (same rules as :meth:`dma_unmap`)."""
        return self.dma_unmap(iova, size)

    # -- attaching to an address space ----------------------------------------------------

    @property
    def address_space(self) -> AddressSpace | None:
        return self._space

    def plain_sections(self) -> list[PlainSection]:
        """The sections mapped whole (no manager, or discards not coordinated), in address
        order."""
        with self._lock:
            return sorted(self._plain_sections.values(), key=lambda p: p.section.offset_within_address_space)

    def worst_case_mappings(self) -> int:
        """What QEMU's DMA-limit check assumes the registered RDM sections may need
        (:func:`~ramdiscard.consumers.vfio.limits.worst_case_mappings`)."""
        with self._lock:
            return worst_case_mappings(self._rdm_ranges(), self.max_memslots)

    def rdm_sections(self) -> list[RdmSection]:
        """The registered RDM section records, in address order."""
        with self._lock:
            return sorted(
                self._rdm_sections.values(), key=lambda r: r.registered_section.offset_within_address_space
            )

    def attach(self, address_space: AddressSpace) -> None:
        """Take the discard-policy count and become a memory listener of ``address_space``
        (every current section is added now).

        Raises ContainerStateError if attached already, DiscardPolicyError if the policy
        conflicts, or the first section's error; then nothing stays attached, mapped,
        pinned or held.
        """
        with address_space.system.lock:
            with self._lock:
                if self._space is not None:
                    raise ContainerStateError(f"{self!r} is already attached")
                policy = self._policy if self._policy is not None else policy_of(address_space.system)
                take = policy.uncoordinated_disable if self.coordinate_discards else policy.disable
                take(True)
                self._held_policy = policy
                self._space = address_space
            try:
                address_space.register_listener(self)
            except BaseException:
                with self._lock:
                    self._space = None
                    self._held_policy = None
                    take(False)
                raise

    def detach(self) -> None:
        """Stop listening: every section is removed (unmapped, unpinned, unregistered from
        its manager), then the discard-policy count is released. Mappings made directly
        with :meth:`dma_map` / :meth:`iommu_map` stay."""
        with self._system_lock():
            space, policy = self._space, self._held_policy
            if space is None or policy is None:
                raise ContainerStateError(f"{self!r} is not attached")
            try:
                space.unregister_listener(self)
            finally:
                self._space = None
                self._held_policy = None
                if self.coordinate_discards:
                    policy.uncoordinated_disable(False)
                else:
                    policy.disable(False)

    def close(self) -> None:
        """Detach if attached and unmap everything. The backend stays open."""
        with self._system_lock():
            if self._space is not None:
                self.detach()
            self.unmap_all()

    def __enter__(self) -> VfioContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- MemoryListener -----------------------------------------------------------------

    def region_add(self, section: MemoryRegionSection) -> None:
        mr = section.mr
        if not mr.is_ram:
            return
        key = (id(mr), section.offset_within_address_space)
        with self._lock:
            if key in self._rdm_sections or key in self._plain_sections:
                raise ListenerError(f"{section!r} was added twice")
            host = self._host_base(mr)
            rdm = manager_of(mr)
            if rdm is None or not self.coordinate_discards:
                if section.size == 0:
                    return
                address = host + section.offset_within_region
                self.dma_map(section.offset_within_address_space, address, section.size, section.readonly)
                self._plain_sections[key] = PlainSection(section, address)
                return
            for name, value in (
                ("offset in region", section.offset_within_region),
                ("address", section.offset_within_address_space),
                ("size", section.size),
            ):
                if value % IOMMU_PAGE_SIZE:
                    raise InvalidArgument(f"vfio: {section!r}: {name} {value:#x} is not page aligned")
            granularity = rdm.get_min_granularity(mr)
            if not is_power_of_2(granularity) or granularity < IOMMU_PAGE_SIZE:
                raise InvalidArgument(
                    f"vfio: {rdm!r} granularity {granularity:#x} is not a power of two of at "
                    f"least the IOMMU page size {IOMMU_PAGE_SIZE:#x}"
                )
            if self.dma_limit_check:
                records = self._rdm_ranges()
                records.append(RdmRange(section.offset_within_address_space, section.size, granularity))
                check_dma_limit(records, self.max_memslots, self.max_mappings)
            record = RdmSection(self._maps, rdm, section, granularity, host)
        # Not under our lock: the replay notifies us with the manager's lock held.
        rdm.register_listener(record, section)
        with self._lock:
            self._rdm_sections[key] = record

    def region_del(self, section: MemoryRegionSection) -> None:
        key = (id(section.mr), section.offset_within_address_space)
        with self._lock:
            record = self._rdm_sections.pop(key, None)
            plain = self._plain_sections.pop(key, None) if record is None else None
            if plain is not None:
                self.dma_unmap(section.offset_within_address_space, section.size)
        if record is not None:
            # Not under our lock: the discards arrive with the manager's lock held.
            record.rdm.unregister_listener(record)

    # -- internals ------------------------------------------------------------------------

    def _rdm_ranges(self) -> list[RdmRange]:
        return [
            RdmRange(
                r.registered_section.offset_within_address_space, r.registered_section.size, r.granularity
            )
            for r in self._rdm_sections.values()
        ]

    @staticmethod
    def _host_base(mr: MemoryRegion) -> int:
        if not mr.is_ram or mr.ram is None:
            raise InvalidArgument(f"{mr.name!r} is not RAM backed by host memory")
        return mr.ram.host_address
