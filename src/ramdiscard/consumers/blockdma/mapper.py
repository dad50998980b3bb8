"""RamBlockDmaMapper: every RAM block mapped for DMA in a private IOVA space (QEMU's nvme://).

QEMU's userspace NVMe driver (``block/nvme.c`` over ``util/vfio-helpers.c``) follows the
RAM block list, not an address space: it maps every RAMBlock into its own IOVA space so
that any guest buffer can be handed to the device, and pins it all. It therefore takes
the "disable all discards" count and cannot run beside virtio-mem (qemu-ram-discard §3.7).
This mapper does the same job but honours RamDiscardManagers, like the vfio container
(§4.1), so it only needs the "disable uncoordinated discards" count.

Rules:

* Each block gets one IOVA range from an :class:`~ramdiscard.consumers.blockdma.iova.IovaAllocator`
  for its whole life in the registry: ``max_size`` rounded up to ``iova_align``, aligned
  to ``iova_align``. Region offset ``o`` is at IOVA ``range start + o``. The range is
  freed when the block is removed and reused by later blocks.
* A block is in one of four modes, recomputed on every event of its block:

  =============  ==========================================================  ==============
  mode           when                                                        pinned
  =============  ==========================================================  ==============
  ``whole``      no manager, or ``coordinate_discards=False``                the used length
  ``listener``   manager, region mapped in some address space               populated
                                                                             granules only
  ``parked``     manager, region not mapped                                  nothing
  ``failed``     setting up the mode above failed outside construction      nothing
  =============  ==========================================================  ==============

  A manager can change only while the region is unmapped, so the listener is registered
  at ``mapped`` and unregistered at ``unmapped`` (virtio-mem refuses to unrealize while a
  listener remains). ``whole`` -> ``parked`` happens at ``manager_changed``, before the
  provider discards the block, so no pin ever goes stale.
* In ``listener`` mode a :class:`~ramdiscard.rdm.RamDiscardListener` with
  ``double_discard_supported`` covers ``[0, min(region size, used length))``. Populate pins
  every granule separately (:func:`~ramdiscard.consumers.dma.granules.granule_pieces`) in one
  all-or-nothing ``pin_many``: if a pin fails, nothing of the notification stays pinned
  and the error propagates, so the provider rolls back and the guest sees BUSY. Discard
  unpins every granule inside the range; holes are fine.
* Resize: a ``whole`` block pins a grown tail as one more pin, and for a shrink unpins
  what lies beyond the new size (a pin straddling it is replaced by a shorter one, pinned
  first). A ``listener`` block re-registers its listener over the new extent: populated
  granules beyond the new size are unpinned, populated ones in a grown part are pinned.
  (A shrink has discarded the tail before the event; the tail's pins were stale meanwhile.)
* Construction registers with the RAM block registry and replays every block; any error
  (policy conflict, IOVA exhaustion, a failed pin) undoes everything and propagates.
  After construction a failed setup cannot be refused to anybody: the block goes to
  ``failed`` (nothing pinned, the error in :meth:`RamBlockDmaMapper.blocks` and logged)
  and its next event tries again. A block added later that finds no free IOVA range is
  not followed at all (logged by the registry). A failed unpin is logged and retried at
  the next teardown and at :meth:`RamBlockDmaMapper.close`.
* Policy: ``coordinate_discards=True`` holds the uncoordinated-disable count (Du) and
  ``False`` the disable-all count (D), like nvme:// today; with D held, virtio-mem cannot
  realize ("Discarding RAM is disabled"), and the mapper cannot be created while
  virtio-mem holds coordinated-require.
* Everything runs under the topology lock of the registry's memory system (the model's
  BQL); notifications from managers arrive with the manager's lock held too.

Per-block bookkeeping (IOVA range, mode, sorted pins) is
:mod:`ramdiscard.consumers.blockdma.block`. The mapper does not own the backend:
:meth:`RamBlockDmaMapper.close` unpins what the mapper pinned and leaves the backend open.
"""

from __future__ import annotations

import logging
from types import TracebackType

from ramdiscard.consumers.blockdma.block import BlockStatus, MappedBlock, MappingMode, Pin
from ramdiscard.consumers.blockdma.iova import IovaAllocator
from ramdiscard.consumers.dma import stale_pinned_bytes
from ramdiscard.consumers.dma.backend import PAGE_SIZE, PinHandle
from ramdiscard.consumers.dma.granules import granule_pieces
from ramdiscard.errors import InvalidArgument, RamDiscardError
from ramdiscard.interfaces import DmaPinner
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.memory.system import MemorySystem, default_system
from ramdiscard.ramblocks.block import LiveBlock
from ramdiscard.ramblocks.notifier import RamBlockNotifier
from ramdiscard.ramblocks.registry import RamBlockRegistry, registry_of
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.rdm.manager import manager_of
from ramdiscard.rdm.policy import DiscardPolicy, policy_of
from ramdiscard.units import MiB, align_up, format_size, is_power_of_2

log = logging.getLogger("ramdiscard.consumers.blockdma")

DEFAULT_IOVA_BASE = 1 << 32
DEFAULT_IOVA_SIZE = (1 << 48) - DEFAULT_IOVA_BASE
DEFAULT_IOVA_ALIGN = 2 * MiB


class _BlockListener(RamDiscardListener):
    """Pins populated granules of one block (QEMU's VFIORamDiscardListener, per block)."""

    double_discard_supported = True

    def __init__(self, mapper: RamBlockDmaMapper, block: MappedBlock, granularity: int) -> None:
        self.mapper = mapper
        self.block = block
        self.granularity = granularity

    def __repr__(self) -> str:
        return f"<blockdma listener {self.block.region.name!r}>"

    def notify_populate(self, section: MemoryRegionSection) -> None:
        pieces = list(granule_pieces(section.offset_within_region, section.end, self.granularity))
        self.mapper._pin_pieces(self.block, [(start, end - start) for start, end in pieces])

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.mapper._unpin_range(self.block, section.offset_within_region, section.end)


class RamBlockDmaMapper(RamBlockNotifier):
    """Maps every RAM block of ``registry`` for DMA through ``backend``; see the module rules.

    ``RamBlockDmaMapper(backend, *, coordinate_discards=True, policy=None, registry=None,
    system=None, iova_base=4 GiB, iova_size=2**48 - 4 GiB, iova_align=2 MiB)``

    ``registry`` defaults to the system registry of ``system`` (default: the default
    memory system), ``policy`` to the policy of the registry's system.

    Raises DiscardPolicyError when the policy count cannot be taken, InvalidArgument for a
    bad IOVA window, IovaExhausted, or a backend error from pinning a block; nothing is
    held then. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        backend: DmaPinner,
        *,
        coordinate_discards: bool = True,
        policy: DiscardPolicy | None = None,
        registry: RamBlockRegistry | None = None,
        system: MemorySystem | None = None,
        iova_base: int = DEFAULT_IOVA_BASE,
        iova_size: int = DEFAULT_IOVA_SIZE,
        iova_align: int = DEFAULT_IOVA_ALIGN,
    ) -> None:
        if not is_power_of_2(iova_align) or iova_align < PAGE_SIZE:
            raise InvalidArgument(f"iova_align {iova_align:#x} must be a power of two >= {PAGE_SIZE:#x}")
        self.backend = backend
        self.coordinate_discards = coordinate_discards
        self.iova = IovaAllocator(iova_base, iova_size, align=iova_align)
        if registry is None:
            registry = registry_of(system if system is not None else default_system())
        self._registry = registry
        self._policy = policy if policy is not None else policy_of(registry.system)
        self._system_lock = registry.system.lock
        self._blocks: dict[int, MappedBlock] = {}
        self._stuck: list[PinHandle] = []
        self._attaching = True
        self._closed = False
        if coordinate_discards:
            self._policy.uncoordinated_disable(True)
        else:
            self._policy.disable(True)
        try:
            self._registry.add_notifier(self)
        except BaseException:
            for b in list(self._blocks.values()):  # the registry's rollback dropped them all
                self._drop(b)
            self._retry_stuck()
            self._release_policy()
            raise
        finally:
            self._attaching = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self._blocks)} blocks"
        return f"<RamBlockDmaMapper {state}, {format_size(self.pinned_bytes)} pinned>"

    # -- queries ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pinned_bytes(self) -> int:
        """Bytes this mapper holds pinned, including pins whose release failed."""
        with self._system_lock:
            return sum(b.pinned_bytes for b in self._blocks.values()) + sum(h.size for h in self._stuck)

    def stale_pinned_bytes(self) -> int:
        """Bytes pinned by ``whole`` blocks that are not resident: memory discarded under a
        live pin (a provider that discards without the mapper following), which the pin
        keeps from being freed. Listener blocks unpin before a discard, so never count."""
        with self._system_lock:
            return sum(
                stale_pinned_bytes(self.backend, b.region.ram, p.offset, p.size)
                for b in self._blocks.values()
                if b.mode is MappingMode.WHOLE
                for p in b.pins()
            )

    @property
    def stuck_pins(self) -> tuple[PinHandle, ...]:
        """Pins whose unpin failed; retried at the next teardown and at close."""
        return tuple(self._stuck)

    def blocks(self) -> list[BlockStatus]:
        """Every block the mapper follows, in registry order."""
        with self._system_lock:
            return [self.block(b.region) for b in self._blocks.values()]

    def block(self, mr: MemoryRegion) -> BlockStatus:
        """The status of ``mr``'s block; InvalidArgument if the mapper does not follow it."""
        with self._system_lock:
            b = self._blocks.get(id(mr))
            if b is None or b.region is not mr:
                raise InvalidArgument(f"{mr!r} is not followed by {self!r}")
            return b.status()

    def iova_of(self, mr: MemoryRegion, offset: int = 0) -> int:
        """The IOVA of region offset ``offset`` of ``mr``'s block."""
        b = self._blocks.get(id(mr))
        if b is None:
            raise InvalidArgument(f"{mr!r} is not followed by {self!r}")
        if not 0 <= offset < b.iova_size:
            raise InvalidArgument(f"offset {offset:#x} is outside the IOVA range of {mr.name!r}")
        return b.iova + offset

    def dma_read(self, iova: int, length: int) -> bytes:
        """Read ``length`` bytes at ``iova`` as the device would: through one pin.

        Raises InvalidArgument (an IOMMU fault) unless one pin covers the whole range.
        """
        with self._system_lock:
            for b in self._blocks.values():
                if b.iova <= iova < b.iova + b.iova_size:
                    offset = iova - b.iova
                    pin = b.covering(offset, length)
                    if pin is not None:
                        return self.backend.dma_read(pin.handle, offset - pin.offset, length)
                    break
            raise InvalidArgument(f"IOMMU fault: [{iova:#x}, +{length:#x}) is not mapped")

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Unpin everything, leave the registry and release the policy count. Idempotent."""
        with self._system_lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._registry.remove_notifier(self)
            finally:
                for b in list(self._blocks.values()):
                    self._drop(b)
                self._retry_stuck()
                if self._stuck:
                    log.error("blockdma: %d pins could not be released", len(self._stuck))
                self._release_policy()

    def __enter__(self) -> RamBlockDmaMapper:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _release_policy(self) -> None:
        if self.coordinate_discards:
            self._policy.uncoordinated_disable(False)
        else:
            self._policy.disable(False)

    # -- RAM block events -------------------------------------------------------------------

    def ram_block_added(self, block: LiveBlock) -> None:
        align = max(self.iova.align, block.page_size)
        iova = self.iova.alloc(block.max_size, align)
        b = MappedBlock(block.region, iova, align_up(block.max_size, align))
        self._blocks[id(block.region)] = b
        try:
            self._settle(b)
        except Exception as exc:
            if not self._attaching:
                self._fail(b, exc)
                return
            self._drop(b)
            raise
        except BaseException:
            self._drop(b)
            raise

    def ram_block_removed(self, block: LiveBlock) -> None:
        b = self._blocks.get(id(block.region))
        if b is not None:
            self._drop(b)

    def ram_block_mapped(self, block: LiveBlock) -> None:
        self._event(block)

    def ram_block_unmapped(self, block: LiveBlock) -> None:
        self._event(block)

    def ram_block_manager_changed(self, block: LiveBlock) -> None:
        self._event(block)

    def ram_block_resized(self, block: LiveBlock, old_size: int, new_size: int) -> None:
        b = self._blocks.get(id(block.region))
        if b is None:
            return
        if b.mode is MappingMode.WHOLE:
            try:
                self._resize_whole(b, new_size)
            except Exception as exc:
                self._fail(b, exc)
        elif b.mode is MappingMode.LISTENER:
            self._teardown(b)
            self._event(block)
        else:
            self._event(block)

    # -- mode changes -----------------------------------------------------------------------

    def _desired(self, b: MappedBlock) -> MappingMode:
        mr = b.region
        if not self.coordinate_discards or mr.ram_discard_manager is None:
            return MappingMode.WHOLE
        return MappingMode.LISTENER if mr.is_mapped else MappingMode.PARKED

    def _event(self, block: LiveBlock) -> None:
        b = self._blocks.get(id(block.region))
        if b is None:
            return
        try:
            self._settle(b)
        except Exception as exc:
            if self._attaching:
                raise
            self._fail(b, exc)

    def _settle(self, b: MappedBlock) -> None:
        """Bring ``b`` to its desired mode; on failure nothing of it is pinned and it raises."""
        want = self._desired(b)
        if b.mode is want:
            return
        self._teardown(b)
        try:
            if want is MappingMode.WHOLE:
                self._pin(b, 0, b.used_size)
            elif want is MappingMode.LISTENER:
                self._register_listener(b)
        except BaseException:
            self._teardown(b)
            b.mode = MappingMode.FAILED
            raise
        b.mode = want
        b.error = None

    def _fail(self, b: MappedBlock, exc: BaseException) -> None:
        self._teardown(b)
        b.mode = MappingMode.FAILED
        b.error = exc
        log.error("blockdma: mapping of RAM block %r failed, nothing of it is pinned: %s", b.region.name, exc)

    def _register_listener(self, b: MappedBlock) -> None:
        mr = b.region
        rdm = manager_of(mr)
        assert rdm is not None
        granularity = rdm.get_min_granularity(mr)
        if not is_power_of_2(granularity) or granularity < PAGE_SIZE or granularity % b.page_size:
            raise InvalidArgument(
                f"RAM block {mr.name!r}: manager granularity {granularity:#x} is not a power of two "
                f"multiple of the page size"
            )
        size = min(mr.size, b.used_size)
        listener = _BlockListener(self, b, granularity)
        b.listener = listener
        try:
            rdm.register_listener(listener, MemoryRegionSection(mr, 0, size, b.iova, mr.readonly))
        except BaseException:
            b.listener = None
            raise

    def _teardown(self, b: MappedBlock) -> None:
        """Unregister the listener and unpin everything of ``b``; never raises."""
        listener, b.listener = b.listener, None
        if listener is not None and listener.manager is not None:
            try:
                listener.manager.unregister_listener(listener)
            except Exception:
                log.exception("blockdma: unregistering the listener of %r failed", b.region.name)
        for pin in reversed(b.pins()):
            self._unpin(b, pin)
        self._retry_stuck()
        b.mode = MappingMode.PARKED

    def _drop(self, b: MappedBlock) -> None:
        self._teardown(b)
        if self._blocks.get(id(b.region)) is b:
            del self._blocks[id(b.region)]
            self.iova.free(b.iova)

    def _resize_whole(self, b: MappedBlock, new_size: int) -> None:
        end = b.pinned_end
        if new_size > end:
            self._pin(b, end, new_size - end)
            return
        for pin in reversed(b.pins()):
            if pin.offset >= new_size:
                self._unpin(b, pin)
            elif pin.offset + pin.size > new_size:
                self._pin(b, pin.offset, new_size - pin.offset)
                self._unpin(b, pin)

    # -- pins ------------------------------------------------------------------------------

    def _pin(self, b: MappedBlock, offset: int, size: int) -> Pin:
        handle = self.backend.pin(b.host_address + offset, size)
        pin = Pin(offset, size, handle)
        b.add(pin)
        return pin

    def _pin_pieces(self, b: MappedBlock, pieces: list[tuple[int, int]]) -> None:
        """Pin ``(offset, size)`` pieces of ``b`` all-or-nothing (one backend call)."""
        host = b.host_address
        handles = self.backend.pin_many([(host + offset, size) for offset, size in pieces])
        for (offset, size), handle in zip(pieces, handles, strict=True):
            b.add(Pin(offset, size, handle))

    def _unpin(self, b: MappedBlock, pin: Pin) -> None:
        b.remove(pin)
        try:
            self.backend.unpin(pin.handle)
        except Exception as exc:
            if isinstance(exc, RamDiscardError) and self.backend.closed:
                return  # a closed backend released every pin already
            log.error("blockdma: unpin of %r failed, will retry: %s", pin.handle, exc)
            self._stuck.append(pin.handle)

    def _unpin_range(self, b: MappedBlock, start: int, end: int) -> None:
        # Granule-aligned notifications never cut a pin; if one would, the pin stays (DMA
        # into still-populated memory must keep working) and the inconsistency is logged.
        inside, cut = b.in_range(start, end)
        for _pin in cut:
            log.error("blockdma: discard [%#x, %#x) of %r cuts a pin; it stays", start, end, b.region.name)
        for pin in inside:
            self._unpin(b, pin)

    def _retry_stuck(self) -> None:
        stuck, self._stuck = self._stuck, []
        for handle in stuck:
            try:
                self.backend.unpin(handle)
            except Exception:
                if not self.backend.closed:
                    self._stuck.append(handle)
