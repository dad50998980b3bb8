"""KvmMemslots: a memory listener that mirrors RAM sections into real KVM memslots.

Rules:

* Every RAM section of the address space becomes one KVM memslot
  (``KVM_SET_USER_MEMORY_REGION``): guest-physical address = section address, userspace
  address = RAM host address + offset in region, ``KVM_MEM_READONLY`` for read-only
  sections. ``region_del`` deletes the slot (size 0).
* Slot ids are allocated lowest free first and reused after deletion. At most
  ``KVM_CAP_NR_MEMSLOTS`` slots exist (ids ``0 .. nr - 1``); one more raises
  :class:`MemslotsExhausted` before any ioctl.
* A failed ioctl leaves no slot behind and the id free again; the error propagates (during
  :meth:`KvmMemslots.attach` the address space then removes what was added). A failed
  delete is retried once; if that fails too the slot is kept (and listed) and the error
  propagates.
* With virtio-mem dynamic memslots the device maps only the memslot aliases that hold
  plugged blocks, so exactly those exist in KVM (qemu-ram-discard §3.9).
* The VM is anything with KvmVm's memslot calls (:class:`MemslotVm`): a real
  :class:`~ramdiscard.consumers.kvm.ioctl.KvmVm`, or :class:`ModelVm` where ``/dev/kvm`` is not
  usable (same bookkeeping and limit, no ioctl).
* Counters for reports: ``peak_slots``, ``created``, ``deleted``.

Theory of operation: the listener is sans-policy glue between
:class:`~ramdiscard.memory.AddressSpace` and :class:`~ramdiscard.consumers.kvm.ioctl.KvmVm`; the
bookkeeping is a dict keyed by (region, address) plus a heap of freed ids.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from types import TracebackType

from ramdiscard.consumers.kvm.ioctl import KVM_MEM_READONLY, KvmVm
from ramdiscard.errors import InvalidArgument, ListenerError, ResourceExhausted
from ramdiscard.interfaces import MemslotVm
from ramdiscard.memory.address_space import AddressSpace, MemoryListener
from ramdiscard.memory.section import MemoryRegionSection


class MemslotsExhausted(ResourceExhausted):
    """Every memslot KVM allows (KVM_CAP_NR_MEMSLOTS) is in use; nothing was created."""


@dataclass(frozen=True, slots=True)
class Memslot:
    """One KVM memslot as registered."""

    slot: int
    gpa: int
    size: int
    host_address: int
    readonly: bool = False


class ModelVm:
    """A VM without ``/dev/kvm``: accepts every memslot call (no ioctl) and reports
    ``nr_memslots`` (KVM's x86 value by default). For hosts without KVM and for replaying
    traces, where only the memslot count matters."""

    def __init__(self, nr_memslots: int = 32764) -> None:
        self._nr = nr_memslots

    def nr_memslots(self) -> int:
        return self._nr

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        pass

    def delete_memory_region(self, slot: int) -> None:
        pass

    def close(self) -> None:
        pass


class KvmMemslots(MemoryListener):
    """Mirror of RAM sections as KVM memslots of ``vm`` (a new real VM when None, owned and
    closed by :meth:`close`; a given VM is not closed). ``max_slots`` lowers the limit below
    KVM_CAP_NR_MEMSLOTS (e.g. to keep slots for other users); it never raises it."""

    def __init__(self, vm: MemslotVm | None = None, *, max_slots: int | None = None) -> None:
        if max_slots is not None and (
            isinstance(max_slots, bool) or not isinstance(max_slots, int) or max_slots < 1
        ):
            raise InvalidArgument(f"max_slots must be a positive int, got {max_slots!r}")
        self._own_vm = vm is None
        self.vm: MemslotVm = KvmVm() if vm is None else vm
        try:
            self.kvm_nr_memslots = self.vm.nr_memslots()
        except BaseException:
            if self._own_vm:
                self.vm.close()
            raise
        self.nr_memslots = self.kvm_nr_memslots if max_slots is None else min(max_slots, self.kvm_nr_memslots)
        self._slots: dict[tuple[int, int], Memslot] = {}
        self._free: list[int] = []
        self._next = 0
        self._space: AddressSpace | None = None
        self.peak_slots = 0
        self.created = 0
        self.deleted = 0

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def slots(self) -> list[Memslot]:
        """The live memslots in guest-physical order."""
        return sorted(self._slots.values(), key=lambda m: m.gpa)

    @property
    def address_space(self) -> AddressSpace | None:
        return self._space

    def attach(self, address_space: AddressSpace) -> None:
        """Register with ``address_space`` (a memslot for every current RAM section)."""
        if self._space is not None:
            raise ListenerError(f"{self!r} is already attached")
        address_space.register_listener(self)
        self._space = address_space

    def detach(self) -> None:
        """Unregister (every memslot is deleted)."""
        if self._space is None:
            raise ListenerError(f"{self!r} is not attached")
        space, self._space = self._space, None
        space.unregister_listener(self)

    def close(self) -> None:
        """Detach if attached and close an owned VM."""
        if self._space is not None:
            self.detach()
        if self._own_vm:
            self.vm.close()

    def __enter__(self) -> KvmMemslots:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- MemoryListener -----------------------------------------------------------------

    def region_add(self, section: MemoryRegionSection) -> None:
        mr = section.mr
        if not mr.is_ram or section.size == 0:
            return
        if mr.ram is None:
            raise InvalidArgument(f"{mr.name!r} has no host memory to register with KVM")
        key = (id(mr), section.offset_within_address_space)
        if key in self._slots:
            raise ListenerError(f"{section!r} was added twice")
        slot = self._take_id(section)
        host = mr.ram.host_address + section.offset_within_region
        try:
            self.vm.set_user_memory_region(
                slot,
                section.offset_within_address_space,
                section.size,
                host,
                KVM_MEM_READONLY if section.readonly else 0,
            )
        except BaseException:
            heapq.heappush(self._free, slot)
            raise
        self._slots[key] = Memslot(
            slot, section.offset_within_address_space, section.size, host, section.readonly
        )
        self.created += 1
        self.peak_slots = max(self.peak_slots, len(self._slots))

    def region_del(self, section: MemoryRegionSection) -> None:
        memslot = self._slots.pop((id(section.mr), section.offset_within_address_space), None)
        if memslot is None:
            return
        try:
            try:
                self.vm.delete_memory_region(memslot.slot)
            except OSError:
                # The section is gone from the address space whatever happens here; a slot
                # left behind would let the guest fault in memory that was unplugged. Try
                # once more before giving up (transient EINTR/ENOMEM).
                self.vm.delete_memory_region(memslot.slot)
        except BaseException:
            self._slots[(id(section.mr), section.offset_within_address_space)] = memslot
            raise
        heapq.heappush(self._free, memslot.slot)
        self.deleted += 1

    def _take_id(self, section: MemoryRegionSection) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next >= self.nr_memslots:
            raise MemslotsExhausted(
                f"cannot create a KVM memslot for {section!r}: all {self.nr_memslots} memslots "
                f"(KVM_CAP_NR_MEMSLOTS = {self.kvm_nr_memslots}) are in use"
            )
        self._next += 1
        return self._next - 1
