"""The four effect interfaces: what the sans-I/O cores need from the outside world.

Every effect the library has on the host (memory, DMA pins, KVM memslots) or receives
from a guest (virtqueue requests) goes through one of these small protocols. Cores are
typed against them, never against a concrete class, so a test double or another host
facility can stand in. All are ``runtime_checkable``: ``isinstance`` checks that the
members exist (not their signatures).

1. **Host memory** -- the RAM block behind a RAM memory region.
   :class:`HostMemory` is what every RAM region needs (size, host address, page size).
   Optional capabilities are separate protocols, checked with ``isinstance``:
   :class:`DiscardableMemory` (discard and populate ranges: what a provider such as
   virtio-mem needs), :class:`MeasurableMemory` (resident bytes of a range),
   :class:`ResizableMemory` (a reserved ``max_size`` above the used size),
   :class:`MappedMemory` (a memoryview of the used bytes, for dumps, migration and
   workloads) and :class:`FileBackedMemory` (the descriptor of a memfd or file, when the
   pages are shared memory rather than anonymous). Implemented by
   :class:`ramdiscard.hostmem.RamBlock` (all of them); tests use doubles with fewer
   capabilities.

2. **DMA backend** -- :class:`DmaPinner`: pins host pages the way a device doing DMA holds
   them (all-or-nothing pins, handles, reads through a pin, close). Implemented by every
   :class:`ramdiscard.consumers.dma.DmaBackend` subclass (io_uring, mlock, null); used by
   the vfio container and the block-DMA mapper.

3. **KVM memslots VM** -- :class:`MemslotVm`: the memslot calls of a VM. Implemented by
   :class:`ramdiscard.consumers.kvm.KvmVm` (real ioctls) and
   :class:`ramdiscard.consumers.kvm.ModelVm` (bookkeeping only); used by ``KvmMemslots``.

4. **Virtqueue transport** -- :class:`Virtqueue`: the device side of one virtqueue. An
   element (:class:`VirtqElement`) carries the device-readable request bytes and the
   capacity of its device-writable response buffer, as a descriptor chain does. The
   device pops elements, writes a response into each with :meth:`Virtqueue.push` (the
   used length is the response's length), drops a malformed one with
   :meth:`Virtqueue.detach` (no used entry, as QEMU's ``virtio_error`` path does) and
   tells the driver with :meth:`Virtqueue.notify`. Implemented in process by
   :class:`ramdiscard.virtqueue.LocalVirtqueue` (what the guest driver model uses); a
   vhost-user backend implements it over a split ring in shared guest memory. Served for
   virtio-mem by :class:`ramdiscard.providers.virtio_mem.virtqueue.VirtioMemQueue`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from ramdiscard.errors import ProtocolViolation

# -- 1. host memory ------------------------------------------------------------------------


@runtime_checkable
class HostMemory(Protocol):
    """Host memory behind a RAM region: ``size`` used bytes mapped at ``host_address`` in
    this process, discarded/populated in units of ``page_size``."""

    @property
    def size(self) -> int: ...

    @property
    def host_address(self) -> int: ...

    @property
    def page_size(self) -> int: ...


@runtime_checkable
class DiscardableMemory(HostMemory, Protocol):
    """Host memory whose ranges can be given back to the host and faulted in again.

    Both take a ``page_size``-aligned range inside ``[0, size)`` and raise
    InvalidArgument (nothing changed) or HostMemoryError.
    """

    def discard_range(self, offset: int, length: int) -> None:
        """Free the pages of the range; later reads see zeroes (or the file's content)."""

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        """Make the range resident (prealloc), for writing unless ``write`` is False."""


@runtime_checkable
class MeasurableMemory(Protocol):
    """Host memory that can tell how much of a range is resident."""

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        """Resident bytes of ``[offset, +length)`` (to the end when ``length`` is None)."""


@runtime_checkable
class ResizableMemory(Protocol):
    """Host memory that reserves ``max_size`` bytes, of which ``size`` are in use."""

    @property
    def max_size(self) -> int: ...


@runtime_checkable
class MappedMemory(Protocol):
    """Host memory readable and writable from this process through a memoryview."""

    @property
    def view(self) -> memoryview:
        """The used bytes (owned by the memory: do not keep it across a resize or close)."""


@runtime_checkable
class FileBackedMemory(Protocol):
    """Host memory that may be a file's pages (memfd or file) rather than anonymous."""

    @property
    def fd(self) -> int | None:
        """The file's descriptor, or None for anonymous memory (or once closed)."""


def reserved_size(ram: HostMemory) -> int:
    """Bytes reserved for ``ram``: its ``max_size`` if it is resizable, else its size."""
    return int(ram.max_size) if isinstance(ram, ResizableMemory) else int(ram.size)


@dataclass(frozen=True)
class PinHandle:
    """One live pin of a :class:`DmaPinner`: the pinned range plus a backend-private token
    identifying it."""

    host_address: int
    size: int
    token: int = field(repr=False)

    @property
    def end(self) -> int:
        return self.host_address + self.size


# -- 2. DMA backend ------------------------------------------------------------------------


@runtime_checkable
class DmaPinner(Protocol):
    """Pins host memory for DMA; the contract is in :mod:`ramdiscard.consumers.dma.backend`
    (4 KiB-aligned ranges, all-or-nothing pins, argument errors before any effect,
    BackendClosed after :meth:`close`)."""

    def pin(self, host_address: int, size: int) -> PinHandle: ...

    def unpin(self, handle: PinHandle) -> None: ...

    def pin_many(self, ranges: Sequence[tuple[int, int]]) -> list[PinHandle]: ...

    def unpin_many(self, handles: Sequence[PinHandle]) -> None: ...

    def holds(self, handle: PinHandle) -> bool: ...

    def dma_read(self, handle: PinHandle, offset: int, length: int) -> bytes: ...

    @property
    def pinned_bytes(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    def close(self) -> None: ...


# -- 3. KVM memslots VM --------------------------------------------------------------------


@runtime_checkable
class MemslotVm(Protocol):
    """The memslot calls of a KVM VM (``KVM_CAP_NR_MEMSLOTS``, ``KVM_SET_USER_MEMORY_REGION``).
    A failing call raises and leaves that slot as it was."""

    def nr_memslots(self) -> int: ...

    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int, flags: int = 0
    ) -> None: ...

    def delete_memory_region(self, slot: int) -> None: ...

    def close(self) -> None: ...


# -- 4. virtqueue transport ----------------------------------------------------------------


class VirtqElement(NamedTuple):
    """One available descriptor chain as the device sees it (immutable).

    ``head``: the chain's id, unique among the queue's in-flight elements. ``request``:
    the device-readable bytes (the out descriptors, concatenated). ``response_capacity``:
    total bytes of the device-writable (in) descriptors.
    """

    head: int
    request: bytes
    response_capacity: int


class VirtqueueError(ProtocolViolation):
    """Raised by :meth:`Virtqueue.pop` when the driver's ring itself is malformed (a
    descriptor outside guest memory, a loop, a bad index): the device must treat it as a
    protocol violation of the driver. Nothing was popped."""


@runtime_checkable
class Virtqueue(Protocol):
    """The device side of one virtqueue. Every element :meth:`pop` returns must be given
    back exactly once, by :meth:`push` or :meth:`detach`."""

    def pop(self) -> VirtqElement | None:
        """The next available element, or None when the driver has made none available.
        Raises VirtqueueError when the driver's ring is malformed."""

    def push(self, element: VirtqElement, response: bytes) -> None:
        """Write ``response`` into the element's writable buffer and mark it used with
        ``len(response)`` written bytes. Raises InvalidArgument (nothing changed) if the
        element is not in flight or ``response`` exceeds its ``response_capacity``."""

    def detach(self, element: VirtqElement) -> None:
        """Give the element back without a used entry (the driver never gets an answer
        for it). Raises InvalidArgument if it is not in flight."""

    def notify(self) -> None:
        """Tell the driver that used elements are ready (the used-buffer interrupt)."""
