"""RamBlockAttributes: shared/private state of a guest_memfd-backed RAM region (QEMU 10.1+).

Rules:

* **Shared means populated, private means discarded.** One bit per host page; everything
  is private at creation, as KVM marks guest_memfd memory private when it is mapped. The
  granularity is always the host page size, whatever the shared side's page size.
* Creation takes the DiscardPolicy's coordinated-require count (DiscardPolicyError and
  nothing else happens if discards are disabled) and makes the object answer for the
  region through :func:`~ramdiscard.rdm.aggregate.add_ram_discard_source`: it becomes the
  region's manager, or, when the region already has one (a virtio-mem device), a source of
  an aggregate with it. :meth:`close` undoes all of it.
* ``state_change(offset, size, to_private)``: offset and size must be non-zero multiples of
  the page size and the range inside the region, else InvalidArgument and nothing changes.
  To private notifies discard for the shared runs; to shared notifies populate for the
  private runs. **Unlike QEMU, a refused populate rolls back**: every listener and the
  bitmap end as before, and the refusal propagates (QEMU updates its bitmap first and
  leaves other listeners populated).
* ``convert(offset, size, to_private)`` is QEMU's ``kvm_convert_memory`` for this region:
  set the KVM memory attributes (where the VM supports them), ``state_change``, then free
  the side that was left: converting to private discards the shared backing
  (``discard_range`` of the RAM block, skipped for hugetlb-backed blocks as in QEMU), converting
  to shared punches the range out of the guest_memfd. Listeners therefore unmap before the
  shared pages are freed and map the new shared pages before the private copy is dropped.
  If ``state_change`` fails the attributes are set back.

Theory of operation: the state is a :class:`~ramdiscard.rdm.block_state.BlockStateManager`
bitmap, so notifications, rollback and replays are the common ones. The *real* part is the
backing: on a host offering ``KVM_CAP_GUEST_MEMFD`` the object creates (or is given) a KVM
VM and a guest_memfd of the region's size, and binds it with the region's shared mapping
into a ``KVM_MEM_GUEST_MEMFD`` memslot. Without KVM it models the state only and says so
in :attr:`RamBlockAttributes.backend_description` and a logged warning.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import TYPE_CHECKING

from ramdiscard.consumers.kvm import (
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KvmVm,
    guest_memfd_allocate,
    guest_memfd_punch_hole,
)
from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import DiscardableMemory, MeasurableMemory
from ramdiscard.providers.attributes import gmem
from ramdiscard.rdm.aggregate import add_ram_discard_source, remove_ram_discard_source
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.notify import DiscardNotificationError
from ramdiscard.rdm.policy import DiscardPolicy, policy_of

if TYPE_CHECKING:
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.memory.section import MemoryRegionSection

_log = logging.getLogger("ramdiscard.providers.attributes")


class RamBlockAttributes(BlockStateManager):
    """Shared/private state of ``memory``; see the module rules.

    ``guest_memfd``: an existing guest_memfd of at least the region's size (not closed by
    this object). ``kvm_vm``: the VM to create the guest_memfd in and to bind the memslot
    ``slot`` at ``gpa`` (no memslot unless ``slot`` is given). With neither and ``use_kvm``,
    a private VM is created when the host allows it, with the memslot in slot 0 at ``gpa``.
    """

    def __init__(
        self,
        memory: MemoryRegion,
        *,
        guest_memfd: int | None = None,
        kvm_vm: KvmVm | None = None,
        policy: DiscardPolicy | None = None,
        use_kvm: bool = True,
        slot: int | None = None,
        gpa: int = 0,
    ) -> None:
        super().__init__(memory, mmap.PAGESIZE)
        self._policy = policy if policy is not None else policy_of(memory.system)
        self._policy.coordinated_require(True)
        self._vm: KvmVm | None = kvm_vm
        self._own_vm: KvmVm | None = None
        self._gmem_fd = -1
        self._own_gmem = False
        self._slot: int | None = None
        self._gpa = gpa
        self._attributes = False
        self._closed = False
        self._description = ""
        try:
            self._setup_backend(guest_memfd, use_kvm, slot)
            add_ram_discard_source(memory, self)
        except BaseException:
            self._teardown_backend()
            self._policy.coordinated_require(False)
            raise

    # -- backend ------------------------------------------------------------------------

    def _setup_backend(self, guest_memfd: int | None, use_kvm: bool, slot: int | None) -> None:
        size = self.region.size
        if guest_memfd is not None:
            self._gmem_fd = guest_memfd
        elif self._vm is not None or use_kvm:
            if self._vm is None:
                try:
                    self._own_vm = gmem.open_guest_memfd_vm()
                except gmem.GmemUnavailable as exc:
                    self._description = f"model only (no guest_memfd: {exc.strerror})"
                    _log.warning("%s: %s", self.region.name, self._description)
                    return
                self._vm = self._own_vm
                slot = 0 if slot is None else slot
            self._gmem_fd = self._vm.create_guest_memfd(size)
            self._own_gmem = True
        else:
            self._description = "model only (KVM not requested)"
            return
        parts = [f"guest_memfd fd {self._gmem_fd}"]
        if self._own_vm is not None:
            parts.append(f"in a private {gmem.vm_type_name(self._own_vm)} VM")
        ram = self.region.ram
        if self._vm is not None and slot is not None and ram is not None:
            self._vm.set_user_memory_region2(slot, self._gpa, size, ram.host_address, self._gmem_fd)
            self._slot = slot
            parts.append(f"memslot {slot} at GPA {self._gpa:#x} (KVM_MEM_GUEST_MEMFD)")
            if gmem.supports_private_attribute(self._vm):
                self._set_attributes(0, size, private=True)
                self._attributes = True
                parts.append("KVM memory attributes set on conversion")
            else:
                parts.append("KVM memory attributes unsupported by this VM type (modelled)")
        else:
            parts.append("no memslot")
        self._description = ", ".join(parts)

    def _teardown_backend(self) -> None:
        if self._slot is not None and self._vm is not None and self.region.ram is not None:
            try:
                self._vm.delete_memory_region(self._slot)
            except OSError:
                _log.exception("%s: deleting memslot %d failed", self.region.name, self._slot)
            self._slot = None
        if self._own_gmem and self._gmem_fd >= 0:
            os.close(self._gmem_fd)
        self._gmem_fd = -1
        if self._own_vm is not None:
            self._own_vm.close()
            self._own_vm = None
        self._vm = None

    @property
    def backend_description(self) -> str:
        """What is real and what is modelled for this region, in words."""
        return self._description

    @property
    def guest_memfd(self) -> int | None:
        """The guest_memfd backing the private side, or None in the plain model."""
        return self._gmem_fd if self._gmem_fd >= 0 else None

    @property
    def memslot(self) -> tuple[int, int] | None:
        """``(slot, gpa)`` of the guest_memfd memslot, or None."""
        return (self._slot, self._gpa) if self._slot is not None else None

    @property
    def kvm_attributes(self) -> bool:
        """True when conversions also set KVM_SET_MEMORY_ATTRIBUTES."""
        return self._attributes

    def close(self) -> None:
        """Stop answering for the region (RegionMapped while it is mapped, nothing changed
        then), release the memslot, guest_memfd, VM and policy count. Idempotent."""
        if self._closed:
            return
        remove_ram_discard_source(self.region, self)
        self._teardown_backend()
        self._policy.coordinated_require(False)
        self._closed = True

    def __enter__(self) -> RamBlockAttributes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries ------------------------------------------------------------------------

    def is_populated(self, section: MemoryRegionSection) -> bool:
        """QEMU's answer: the pages ``offset // page`` .. ``+ size // page`` are all shared,
        without widening; a section shorter than a page is vacuously shared."""
        with self._lock:
            self.check_section(section)
            first = section.offset_within_region // self.granularity
            count = section.size // self.granularity
            if count == 0:
                return True
            return self._bitmap.all_set(first, min(first + count, self.nb_blocks))

    def is_private(self, offset: int, size: int) -> bool:
        """Every page of the aligned range is private."""
        return self.is_range_discarded(offset, size)

    @property
    def shared_size(self) -> int:
        return self.populated_size

    @property
    def private_size(self) -> int:
        return self.region.size - self.populated_size

    def shared_resident_bytes(self) -> int | None:
        """Host memory resident on the shared side, if the RAM block can measure it."""
        ram = self.region.ram
        return ram.resident_bytes() if isinstance(ram, MeasurableMemory) else None

    # -- state changes ------------------------------------------------------------------

    def _check_range(self, offset: int, size: int) -> None:
        page = self.granularity
        if offset < 0 or size <= 0 or offset % page or size % page or offset + size > self.region.size:
            raise InvalidArgument(
                f"{self.region.name!r}: conversion range [{offset:#x}, +{size:#x}) must be non-empty, "
                f"page aligned ({page:#x}) and inside the region (size {self.region.size:#x})"
            )

    def state_change(self, offset: int, size: int, to_private: bool) -> None:
        """Mark the range private (discard) or shared (populate); see the module rules."""
        self._check_range(offset, size)
        if to_private:
            self.set_discarded(offset, size)
        else:
            self.set_populated(offset, size)

    def convert(self, offset: int, size: int, to_private: bool, *, prealloc_private: bool = False) -> None:
        """Convert region range ``[offset, offset+size)`` (``kvm_convert_memory``).

        ``prealloc_private`` allocates the new private range in the guest_memfd, standing
        in for the guest touching it (there is no vCPU here). Raises InvalidArgument, a
        refusing listener's exception (nothing changed), HostMemoryError from the
        backing after the state change (state converted, memory not freed), or
        DiscardNotificationError after a complete conversion to private if listeners
        raised from their discard (every listener was still told).
        """
        self._check_range(offset, size)
        with self.lock:
            self._check_not_notifying("convert memory")
            if self._attributes:
                self._set_attributes(offset, size, private=to_private)
            listener_failure: DiscardNotificationError | None = None
            try:
                self.state_change(offset, size, to_private)
            except DiscardNotificationError as exc:
                # Every listener was told and the range is private now: finish converting.
                listener_failure = exc
            except BaseException:
                if self._attributes:
                    self._set_attributes(offset, size, private=not to_private)
                raise
            ram = self.region.ram
            if to_private:
                if isinstance(ram, DiscardableMemory) and ram.page_size == self.granularity:
                    ram.discard_range(offset, size)
                if prealloc_private and self._gmem_fd >= 0:
                    guest_memfd_allocate(self._gmem_fd, offset, size)
            elif self._gmem_fd >= 0:
                guest_memfd_punch_hole(self._gmem_fd, offset, size)
            if listener_failure is not None:
                raise listener_failure

    def _set_attributes(self, offset: int, size: int, *, private: bool) -> None:
        assert self._vm is not None
        value = KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0
        self._vm.set_memory_attributes(self._gpa + offset, size, value)

    def convert_gpa(self, gpa: int, size: int, to_private: bool) -> None:
        """:meth:`convert` by guest-physical address inside the memslot."""
        if self._slot is None:
            raise InvalidArgument(f"{self.region.name!r} has no memslot; convert by region offset")
        offset = gpa - self._gpa
        if offset < 0 or offset + size > self.region.size:
            raise InvalidArgument(f"GPA range [{gpa:#x}, +{size:#x}) is outside memslot {self._slot}")
        self.convert(offset, size, to_private)

    def populate_private(self, offset: int, size: int) -> None:
        """Allocate a private range in the guest_memfd (what a guest access would do)."""
        self._check_range(offset, size)
        if not self.is_private(offset, size):
            raise InvalidArgument(f"[{offset:#x}, +{size:#x}) of {self.region.name!r} is not all private")
        if self._gmem_fd < 0:
            raise InvalidArgument(f"{self.region.name!r} has no guest_memfd ({self._description})")
        guest_memfd_allocate(self._gmem_fd, offset, size)
