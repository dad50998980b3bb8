"""VirtioMem: the virtio-mem device model, provider of a RamDiscardManager for its RAM region.

Rules (qemu-ram-discard §3, virtio-mem.md D-* ids):

* The device *is* the RamDiscardManager of its RAM region: one bit per block, set =
  plugged = populated. ``plugged_size`` is popcount * ``block_size``, read from the
  bitmap's incrementally kept popcount (one source of truth, never a whole-map scan).
* Realize (the constructor) follows QEMU's order: property checks, ``coordinated_require``
  ("Discarding RAM is disabled"), set itself as the region's manager, discard the whole
  RAM block, size the usable region, prepare memslots. Any failure releases what was taken
  and raises; nothing stays held.
* Guest requests go through :meth:`VirtioMem.handle_request` (bytes in, bytes out). The
  answer for PLUG/UNPLUG/STATE is decided in QEMU's order: invalid range -> ERROR; (PLUG)
  beyond ``requested_size`` -> NACK; wrong current state -> ERROR; busy, host failure or
  listener refusal -> BUSY; otherwise ACK. A request that is not ACKed changed nothing:
  memory is re-discarded, listeners are rolled back, memslots restored.
* A protocol violation (short request, unknown type) raises :class:`ProtocolError` and
  marks the device broken: every later request raises :class:`DeviceBroken` until
  :meth:`device_reset` or :meth:`system_reset`. No other exception escapes for guest input.
* Effects come in QEMU's order. Plug: busy check, prealloc (``ram.populate``), map
  memslots (dynamic memslots, one transaction), populate notification (with rollback),
  set bits. Unplug: busy check, ``ram.discard_range``, discard notification, clear bits,
  unmap memslots.
* Config-change notifiers fire on every ``requested_size`` write, changed or not (the only
  way the usable region grows); never for ``plugged_size`` changes, an UNPLUG_ALL shrink or
  a system reset (D-CFG-9/10/11). Size-change notifiers (QEMU's MEMORY_DEVICE_SIZE_CHANGE
  source) fire after every ``plugged_size`` change. Notifier exceptions are logged, never
  propagated into the request path.
* Device reset changes no block state and no memory (D-INIT-2/3); system reset unplugs
  everything (a BUSY outcome is ignored, as QEMU does) unless it is a wake-up reset.

Theory of operation: ``block_size``-aligned region offsets index the inherited
:class:`~ramdiscard.rdm.block_state.BlockStateManager` bitmap; every per-request operation
touches only the words of the request's range, so its cost does not grow with the region.
With dynamic memslots the device exposes a container of unmergeable aliases
(:attr:`device_region`); a memslot is mapped while it holds a plugged block, so memory
listeners see one section per mapped memslot. Memslots are mapped *before* the populate
notification, while the bitmap does not yet contain the new blocks: an RDM listener that
registers during the mapping replays the old state and then receives the regular
notification, so every block is announced exactly once.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from ramdiscard.errors import (
    DiscardPolicyError,
    InvalidArgument,
    ListenerError,
    ManagerBusy,
    ProtocolViolation,
    RegionMapped,
)
from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.interfaces import Virtqueue
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.system import TopologyError
from ramdiscard.providers.virtio_mem.metrics import VirtioMemMetrics
from ramdiscard.providers.virtio_mem.virtqueue import serve as serve_queue
from ramdiscard.providers.virtio_mem.wire import (
    U64_MAX,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    ConfigSpace,
    DeviceBroken,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMemError,
    feature_bit,
)
from ramdiscard.rdm.aggregate import AggregateManager, add_ram_discard_source, remove_ram_discard_source
from ramdiscard.rdm.bitmap import Bitmap
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.policy import DiscardPolicy, policy_of
from ramdiscard.units import GiB, MiB, align_up, is_power_of_2

if TYPE_CHECKING:
    from ramdiscard.memory.section import MemoryRegionSection

log = logging.getLogger("ramdiscard.providers.virtio_mem")

USABLE_EXTENT_X86 = 256 * MiB
"""Added to ``requested_size`` when sizing the usable region (x86/s390x; arm uses 1 GiB)."""
MIN_BLOCK_SIZE = 1 * MiB
MIN_MEMSLOT_SIZE = 1 * GiB

ConfigChangeFn = Callable[["VirtioMem"], None]
SizeChangeFn = Callable[[str, int], None]
"""Called with (device id, new plugged size)."""
HostDiscardFn = Callable[[int, int], None]
"""Called with (region offset, length) after every successful host discard."""


class FeatureError(VirtioMemError, ProtocolViolation):
    """Feature negotiation failed (a required feature was not accepted, or an unknown one
    was); the driver must not operate the device."""


def host_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def thp_size() -> int:
    """The THP (PMD) size QEMU would use as the default block size on this host.

    Reads ``hpage_pmd_size``; without THP support (file absent) 1 MiB; an unreadable or
    non-power-of-two value falls back to the architecture default.
    """
    path = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
    if not os.path.exists(path):
        return MIN_BLOCK_SIZE
    try:
        with open(path) as f:
            value = int(f.read().strip())
        if is_power_of_2(value):
            return value
    except (OSError, ValueError):
        pass
    machine = platform.machine()
    if machine in ("x86_64", "ppc64", "ppc64le"):
        return 2 * MiB
    if machine in ("aarch64", "arm64"):
        return {4096: 2 * MiB, 16384: 32 * MiB, 65536: 512 * MiB}.get(host_page_size(), 2 * MiB)
    return MIN_BLOCK_SIZE


def default_block_size(page_size: int) -> int:
    """QEMU's default: max(page size, THP size) for base pages, max(page size, 1 MiB) for
    huge pages, never below 1 MiB."""
    if page_size == host_page_size():
        return max(page_size, thp_size(), MIN_BLOCK_SIZE)
    return max(page_size, MIN_BLOCK_SIZE)


def memslot_geometry(region_size: int, block_size: int, limit: int | None) -> tuple[int, int]:
    """(memslot size, memslot count) for dynamic memslots (qemu-ram-discard §3.9).

    ``limit`` None means unlimited. A limit of 1 or less gives one memslot.
    """
    if limit is not None and limit <= 1:
        return region_size, 1
    minimum = max(block_size, MIN_MEMSLOT_SIZE)
    size = minimum if limit is None else max(align_up(-(-region_size // limit), block_size), minimum)
    if size >= region_size:
        return region_size, 1
    return size, -(-region_size // size)


class VirtioMem(BlockStateManager):
    """A virtio-mem device over the RAM region ``memory``; see the module rules.

    Arguments (QEMU property names in brackets):

    * ``addr`` [memaddr]: guest-physical start, a multiple of the block size.
    * ``block_size`` [block-size]: None for the default; else a power of two, at least
      1 MiB and at least the backing page size.
    * ``requested_size`` [requested-size]: multiple of the block size, at most the region.
    * ``node`` / ``numa_nodes``: NUMA node; must be < ``numa_nodes``, or 0 without NUMA.
      ACPI_PXM is offered only with NUMA.
    * ``prealloc``: populate host memory when blocks get plugged; failure answers BUSY.
      Always on for hugetlb memory (a RAM block whose ``hugetlb`` is true): there an
      unpopulated page would fault from the pool on the guest's first touch and an empty
      pool would end the process with SIGBUS; :attr:`prealloc` reports the effective value.
    * ``unplugged_inaccessible``: offer (and require) VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE.
    * ``persistent_suspend``: offer PERSISTENT_SUSPEND (the machine supports wake-up).
    * ``dynamic_memslots`` / ``memslot_limit``: expose memslots instead of one region;
      needs ``unplugged_inaccessible``.
    * ``policy``: the DiscardPolicy (default: the policy of ``memory``'s memory system).
    * ``busy``: predicate, true while a migration/snapshot runs (requests answer BUSY).
    * ``usable_extent``: added to requested_size for the usable region (256 MiB, x86).
    * ``incoming``: an incoming migration is pending: skip the realize-time discard.
    * ``on_config_change``, ``on_size_change``, ``on_host_discard``: initial notifiers.

    Raises InvalidArgument (a ValueError) for bad properties, DiscardPolicyError when
    discarding is disabled, ManagerBusy/RegionMapped when the manager cannot be set, and
    HostMemoryError when the initial discard fails; nothing is held afterwards.
    """

    def __init__(
        self,
        memory: MemoryRegion,
        *,
        addr: int,
        id: str = "vmem0",
        block_size: int | None = None,
        requested_size: int = 0,
        node: int = 0,
        numa_nodes: int = 0,
        prealloc: bool = False,
        unplugged_inaccessible: bool = True,
        persistent_suspend: bool = False,
        dynamic_memslots: bool = False,
        memslot_limit: int | None = None,
        policy: DiscardPolicy | None = None,
        busy: Callable[[], bool] | None = None,
        usable_extent: int = USABLE_EXTENT_X86,
        incoming: bool = False,
        on_config_change: ConfigChangeFn | None = None,
        on_size_change: SizeChangeFn | None = None,
        on_host_discard: HostDiscardFn | None = None,
    ) -> None:
        prefix = f"virtio-mem {id!r}"
        if not isinstance(memory, MemoryRegion) or not memory.is_ram or memory.ram is None:
            raise InvalidArgument(f"{prefix}: memdev must be a RAM memory region with a RAM block")
        ram = memory.ram
        if not isinstance(ram, HostRam):
            raise InvalidArgument(f"{prefix}: RAM block {ram!r} cannot discard/populate memory")
        current = memory.ram_discard_manager
        users = current.sources if isinstance(current, AggregateManager) else (current,)
        if any(isinstance(user, VirtioMem) for user in users):
            raise InvalidArgument(f"{prefix}: memdev {memory.name!r} is busy (used by another virtio-mem)")
        if numa_nodes < 0 or (node >= numa_nodes if numa_nodes else node != 0):
            raise InvalidArgument(
                f"{prefix}: node {node} is not a valid NUMA node (numa nodes: {numa_nodes})"
            )
        if dynamic_memslots and not unplugged_inaccessible:
            raise InvalidArgument(f"{prefix}: dynamic-memslots requires unplugged-inaccessible=on")
        if usable_extent < 0:
            raise InvalidArgument(f"{prefix}: negative usable extent")
        page_size = ram.page_size
        default_bs = default_block_size(page_size)
        if block_size is None:
            block_size = default_bs
        else:
            if block_size < MIN_BLOCK_SIZE:
                raise InvalidArgument(f"{prefix}: block-size must be at least 1 MiB, got {block_size:#x}")
            if not is_power_of_2(block_size):
                raise InvalidArgument(f"{prefix}: block-size must be a power of two, got {block_size:#x}")
            if block_size < page_size:
                raise InvalidArgument(
                    f"{prefix}: block-size has to be at least the page size of memdev ({page_size:#x})"
                )
            if block_size < default_bs:
                log.warning("%s: block-size %#x is below the default %#x", prefix, block_size, default_bs)
        region_size = memory.size
        if region_size % block_size:
            raise InvalidArgument(
                f"{prefix}: memory backend size must be a multiple of block-size ({block_size:#x})"
            )
        if addr < 0 or addr % block_size or addr + region_size > U64_MAX + 1:
            raise InvalidArgument(f"{prefix}: addr must be a multiple of block-size ({block_size:#x})")
        _check_requested(prefix, requested_size, block_size, region_size)

        super().__init__(memory, block_size)
        self._id = id
        self._prefix = prefix
        self._ram: HostRam = ram
        self._addr = addr
        self._block_size = block_size
        self._region_size = region_size
        self._node = node
        self._numa_nodes = numa_nodes
        # On hugetlb memory an unpopulated page faults in from the pool on first touch, and
        # an empty pool kills the process with SIGBUS; populating at plug time turns that
        # into a BUSY answer, so hugetlb memory always preallocates.
        self._prealloc = prealloc or bool(getattr(ram, "hugetlb", False))
        self._unplugged_inaccessible = unplugged_inaccessible
        self._persistent_suspend = persistent_suspend
        self._dynamic = dynamic_memslots
        self._usable_extent = usable_extent
        self._busy: Callable[[], bool] | None = busy
        self._requested_size = requested_size
        self._usable_region_size = 0
        self._broken = False
        self._driver_features = 0
        self._prealloc_warned = False
        self._realized = False
        self._realize_discarded = False
        self.metrics = VirtioMemMetrics()
        self._config_notifiers: list[ConfigChangeFn] = [on_config_change] if on_config_change else []
        self._size_notifiers: list[SizeChangeFn] = [on_size_change] if on_size_change else []
        self._discard_hooks: list[HostDiscardFn] = [on_host_discard] if on_host_discard else []

        self._policy = policy if policy is not None else policy_of(memory.system)
        try:
            self._policy.coordinated_require(True)
        except DiscardPolicyError as exc:
            raise DiscardPolicyError(f"{prefix}: Discarding RAM is disabled") from exc
        try:
            try:
                # Alone this makes the device the region's manager; beside another provider
                # (guest_memfd attributes) both become sources of one aggregate manager.
                add_ram_discard_source(memory, self)
            except (ManagerBusy, RegionMapped, InvalidArgument) as exc:
                raise type(exc)(f"{prefix}: Failed to set RamDiscardManager: {exc}") from exc
            try:
                if not incoming:
                    self._ram.discard_range(0, self._ram.size)
                    self._realize_discarded = True
                    self._run_discard_hooks(0, self._ram.size)
            except BaseException:
                remove_ram_discard_source(memory, self)
                raise
        except BaseException:
            self._policy.coordinated_require(False)
            raise
        self._resize_usable_region(requested_size, can_shrink=True)

        self._memslot_size, self._nb_memslots = (
            memslot_geometry(region_size, block_size, memslot_limit) if dynamic_memslots else (region_size, 1)
        )
        self._memslots: list[MemoryRegion] = []
        self._container: MemoryRegion | None = None
        if dynamic_memslots:
            self._container = MemoryRegion.new_container(f"{id}-memslots", region_size, system=memory.system)
            for i in range(self._nb_memslots):
                start = i * self._memslot_size
                size = min(self._memslot_size, region_size - start)
                self._memslots.append(
                    MemoryRegion.new_alias(f"{id}-memslot-{i}", memory, start, size, unmergeable=True)
                )
        self._realized = True

    def __repr__(self) -> str:
        return f"<VirtioMem {self._id!r} addr={self._addr:#x} region={self._region_size:#x}>"

    # -- properties ---------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def region_size(self) -> int:
        return self._region_size

    @property
    def usable_region_size(self) -> int:
        return self._usable_region_size

    @property
    def usable_extent(self) -> int:
        """Added to ``requested_size`` (rounded up to blocks) when sizing the usable region."""
        return self._usable_extent

    @property
    def plugged_size(self) -> int:
        """Bytes plugged: popcount(bitmap) * block_size."""
        return self.populated_size

    @property
    def node(self) -> int:
        return self._node

    @property
    def ram(self) -> HostRam:
        return self._ram

    @property
    def prealloc(self) -> bool:
        return self._prealloc

    @property
    def dynamic_memslots(self) -> bool:
        return self._dynamic

    @property
    def realized(self) -> bool:
        return self._realized

    @property
    def realize_discarded(self) -> bool:
        """Whether realize discarded the whole RAM block (not on incoming migration)."""
        return self._realize_discarded

    @property
    def broken(self) -> bool:
        """True after a protocol violation, until a device or system reset."""
        return self._broken

    @property
    def unplugged_inaccessible(self) -> bool:
        """Whether VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE is offered (and required)."""
        return self._unplugged_inaccessible

    @property
    def requested_size(self) -> int:
        return self._requested_size

    @requested_size.setter
    def requested_size(self, value: int) -> None:
        """Host control: the guest is asked to plug ``value`` bytes.

        Raises ValueError unless it is a multiple of the block size and at most the region
        size. The usable region grows (never shrinks) to fit; config-change notifiers fire
        on every successful write, even if nothing changed (D-CFG-9/11).
        """
        with self._lock:
            self._check_realized()
            _check_requested(self._prefix, value, self._block_size, self._region_size)
            if value != self._requested_size:
                self._resize_usable_region(value, can_shrink=False)
                self._requested_size = value
        self._fire_config_change()

    @property
    def host_features(self) -> int:
        """Device feature bits offered to the driver."""
        features = 0
        if self._numa_nodes:
            features |= feature_bit(VIRTIO_MEM_F_ACPI_PXM)
        if self._unplugged_inaccessible:
            features |= feature_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
        if self._persistent_suspend:
            features |= feature_bit(VIRTIO_MEM_F_PERSISTENT_SUSPEND)
        return features

    @property
    def driver_features(self) -> int:
        """Features the driver accepted (0 until negotiated, and after a reset)."""
        return self._driver_features

    def set_driver_features(self, features: int) -> None:
        """Feature negotiation. Raises FeatureError (nothing changes) when the driver accepts
        a feature that was not offered or does not accept an offered
        UNPLUGGED_INACCESSIBLE (D-INIT-1: QEMU fails validation)."""
        offered = self.host_features
        if features & ~offered:
            raise FeatureError(
                f"{self._prefix}: driver accepted features not offered: {features & ~offered:#x}"
            )
        ui = feature_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
        if offered & ui and not features & ui:
            raise FeatureError(
                f"{self._prefix}: the driver does not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, "
                "which this device requires"
            )
        with self._lock:
            self._driver_features = features

    @property
    def device_region(self) -> MemoryRegion:
        """What the machine maps at :attr:`addr`: the RAM region itself, or with dynamic
        memslots the container of memslot aliases."""
        return self._container if self._container is not None else self._region

    @property
    def memslot_size(self) -> int:
        return self._memslot_size

    @property
    def nb_memslots(self) -> int:
        return self._nb_memslots

    @property
    def mapped_memslots(self) -> int:
        """Memslots currently mapped into the container (0 without dynamic memslots)."""
        return sum(1 for m in self._memslots if m.container is not None)

    def config(self) -> ConfigSpace:
        with self._lock:
            return ConfigSpace(
                self._block_size,
                self._node,
                self._addr,
                self._region_size,
                self._usable_region_size,
                self.populated_size,
                self._requested_size,
            )

    def config_bytes(self) -> bytes:
        """The 56-byte config space as the driver reads it."""
        return self.config().pack()

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the config space: ignored (all fields read-only, R-CFG-1)."""
        with self._lock:
            self.metrics.config_writes_ignored += 1

    # -- notifiers ----------------------------------------------------------------------

    def add_config_change_notifier(self, fn: ConfigChangeFn) -> None:
        self._config_notifiers.append(fn)

    def remove_config_change_notifier(self, fn: ConfigChangeFn) -> None:
        self._config_notifiers.remove(fn)

    def add_size_change_notifier(self, fn: SizeChangeFn) -> None:
        self._size_notifiers.append(fn)

    def remove_size_change_notifier(self, fn: SizeChangeFn) -> None:
        self._size_notifiers.remove(fn)

    def add_host_discard_hook(self, fn: HostDiscardFn) -> None:
        self._discard_hooks.append(fn)

    def remove_host_discard_hook(self, fn: HostDiscardFn) -> None:
        self._discard_hooks.remove(fn)

    @property
    def busy_predicate(self) -> Callable[[], bool] | None:
        """The installed busy predicate (None: never busy); see :meth:`set_busy_predicate`."""
        return self._busy

    def set_busy_predicate(self, busy: Callable[[], bool] | None) -> None:
        """Install the predicate that says a migration/snapshot is running (None: never)."""
        with self._lock:
            self._busy = busy

    def _topology_lock(self) -> AbstractContextManager[object]:
        """Taken *before* the device lock on every path that can map or unmap memslots.

        A topology update holds the topology lock and calls into the device (a memory
        listener registering a RamDiscardListener from ``region_add``), so taking the
        device lock first and then the topology lock could deadlock (QEMU holds the BQL
        for both). Without dynamic memslots requests never touch the topology.
        """
        return self.region.system.lock if self._dynamic else nullcontext()

    def is_busy(self) -> bool:
        fn = self._busy
        return bool(fn()) if fn is not None else False

    # -- the request path -----------------------------------------------------------------

    def handle_request(self, request: bytes | bytearray | memoryview) -> bytes:
        """Process one guest request and return the 10-byte response.

        Raises ProtocolError for a short request or unknown type (the device is then
        broken) and DeviceBroken while broken; nothing else for any byte string.
        """
        with self._topology_lock(), self._lock:
            if self._broken:
                self.metrics.broken_refusals += 1
                raise DeviceBroken(f"{self._prefix} is broken after a protocol violation; reset it")
            try:
                req = Request.parse(request)
            except ProtocolError:
                self._broken = True
                self.metrics.protocol_errors += 1
                raise
            return self._execute(req).pack()

    def process(self, req: Request) -> Response:
        """Process a parsed request (the typed path). Raises DeviceBroken while broken."""
        with self._topology_lock(), self._lock:
            if self._broken:
                self.metrics.broken_refusals += 1
                raise DeviceBroken(f"{self._prefix} is broken after a protocol violation; reset it")
            return self._execute(req)

    def process_queue(self, vq: Virtqueue) -> int:
        """Queue-notify handler: serve every available element of ``vq``; see
        :func:`ramdiscard.providers.virtio_mem.virtqueue.serve`."""
        return serve_queue(self, vq)

    def protocol_violation(self, reason: str) -> ProtocolError:
        """Record a violation a transport found (e.g. a response buffer too small): the
        device is broken until reset and nothing else changes. Returns the error to raise."""
        with self._lock:
            self._broken = True
            self.metrics.protocol_errors += 1
        return ProtocolError(f"{self._prefix} protocol violation: {reason}")

    def plug(self, addr: int, nb_blocks: int) -> ResponseType:
        return self.process(Request(RequestType.PLUG, addr, nb_blocks)).type

    def unplug(self, addr: int, nb_blocks: int) -> ResponseType:
        return self.process(Request(RequestType.UNPLUG, addr, nb_blocks)).type

    def unplug_all(self) -> ResponseType:
        return self.process(Request(RequestType.UNPLUG_ALL)).type

    def state(self, addr: int, nb_blocks: int) -> tuple[ResponseType, BlockState | None]:
        resp = self.process(Request(RequestType.STATE, addr, nb_blocks))
        return resp.type, resp.state

    def _execute(self, req: Request) -> Response:
        self._check_realized()
        self._check_not_notifying("process a virtio-mem request")
        self.metrics.count_request(req.type)
        if req.type is RequestType.PLUG:
            resp = Response(self._state_change(req.addr, req.nb_blocks, plug=True))
        elif req.type is RequestType.UNPLUG:
            resp = Response(self._state_change(req.addr, req.nb_blocks, plug=False))
        elif req.type is RequestType.UNPLUG_ALL:
            resp = Response(self._unplug_all())
        else:
            resp = self._state_request(req.addr, req.nb_blocks)
        self.metrics.count_response(resp.type)
        return resp

    def _valid_range(self, gpa: int, size: int) -> bool:
        """QEMU's range validity: aligned, non-empty, no 64-bit overflow, inside the
        usable region."""
        start = self._addr
        end = start + self._usable_region_size
        return (
            gpa % self._block_size == 0
            and size > 0
            and gpa + size <= U64_MAX + 1
            and start <= gpa < end
            and gpa + size <= end
        )

    def _state_request(self, gpa: int, nb_blocks: int) -> Response:
        size = nb_blocks * self._block_size
        if not self._valid_range(gpa, size):
            return Response(ResponseType.ERROR)
        first = (gpa - self._addr) >> self._shift
        count = self._bitmap.count_range(first, first + nb_blocks)
        if count == nb_blocks:
            state = BlockState.PLUGGED
        elif count == 0:
            state = BlockState.UNPLUGGED
        else:
            state = BlockState.MIXED
        return Response(ResponseType.ACK, state)

    def _state_change(self, gpa: int, nb_blocks: int, *, plug: bool) -> ResponseType:
        size = nb_blocks * self._block_size
        if not self._valid_range(gpa, size):
            return ResponseType.ERROR
        if plug and self.populated_size + size > self._requested_size:
            return ResponseType.NACK
        offset = gpa - self._addr
        first = offset >> self._shift
        last = first + nb_blocks
        if plug and not self._bitmap.all_clear(first, last):
            return ResponseType.ERROR
        if not plug and not self._bitmap.all_set(first, last):
            return ResponseType.ERROR
        ok = self._plug_range(offset, size) if plug else self._unplug_range(offset, size)
        if not ok:
            return ResponseType.BUSY
        if plug:
            self.metrics.plugged_bytes += size
        else:
            self.metrics.unplugged_bytes += size
        self._fire_size_change()
        return ResponseType.ACK

    def _plug_range(self, offset: int, size: int) -> bool:
        """Plug an all-unplugged range; False (nothing changed) if it cannot be done now."""
        if self.is_busy():
            self.metrics.busy_count += 1
            return False
        if self._prealloc:
            try:
                self._ram.populate(offset, size)
            except Exception as exc:
                if not self._prealloc_warned:
                    log.warning(
                        "%s: preallocation of [%#x, +%#x) failed: %s", self._prefix, offset, size, exc
                    )
                    self._prealloc_warned = True
                self.metrics.host_failures += 1
                self._rediscard(offset, size)
                return False
        newly_mapped: list[int] = []
        if self._dynamic:
            try:
                self._map_memslots(offset, size, newly_mapped)
            except TopologyError as exc:
                log.warning(
                    "%s: mapping memslots for [%#x, +%#x) failed: %s", self._prefix, offset, size, exc
                )
                self.metrics.listener_refusals += 1
                self._unmap_memslots(newly_mapped)
                self._rediscard(offset, size)
                return False
        try:
            self._notify_populate(offset, size)
        except Exception as exc:
            log.info("%s: populate of [%#x, +%#x) refused: %r", self._prefix, offset, size, exc)
            self.metrics.listener_refusals += 1
            self._unmap_memslots(newly_mapped)
            self._rediscard(offset, size)
            return False
        self._bitmap.set_range(offset >> self._shift, (offset + size) >> self._shift)
        return True

    def _unplug_range(self, offset: int, size: int) -> bool:
        """Unplug an all-plugged range; False (nothing changed) if it cannot be done now."""
        if self.is_busy():
            self.metrics.busy_count += 1
            return False
        if not self._host_discard(offset, size):
            return False
        try:
            self._notify_discard(offset, size)  # reaches every listener even if some raise
        except Exception:
            log.exception("%s: a listener failed a discard notification", self._prefix)
        self._bitmap.clear_range(offset >> self._shift, (offset + size) >> self._shift)
        if self._dynamic:
            self._unmap_unplugged_memslots(offset, size)
        return True

    def _unplug_all(self) -> ResponseType:
        plugged = self.populated_size
        if plugged:
            if self.is_busy():
                self.metrics.busy_count += 1
                return ResponseType.BUSY
            if not self._host_discard(0, self._ram.size):
                return ResponseType.BUSY
            try:
                self._discard_all_blocks()  # every listener is told; the bits are cleared
            except Exception:
                log.exception("%s: a listener failed a discard notification", self._prefix)
            self.metrics.unplugged_bytes += plugged
            self._fire_size_change()
            if self._dynamic:
                self._unmap_unplugged_memslots(0, self._region_size)
        self._resize_usable_region(self._requested_size, can_shrink=True)
        return ResponseType.ACK

    # -- host memory --------------------------------------------------------------------

    def _host_discard(self, offset: int, size: int) -> bool:
        try:
            self._ram.discard_range(offset, size)
        except Exception as exc:
            log.warning("%s: discarding [%#x, +%#x) failed: %s", self._prefix, offset, size, exc)
            self.metrics.host_failures += 1
            return False
        self._run_discard_hooks(offset, size)
        return True

    def _rediscard(self, offset: int, size: int) -> None:
        """Best effort: memory a failed plug may have populated goes back to the host."""
        self._host_discard(offset, size)

    def _run_discard_hooks(self, offset: int, size: int) -> None:
        for hook in list(self._discard_hooks):
            try:
                hook(offset, size)
            except Exception:
                log.exception("%s: host-discard hook %r failed", self._prefix, hook)

    # -- memslots -----------------------------------------------------------------------

    def _memslot_span(self, offset: int, size: int) -> range:
        ms = self._memslot_size
        return range(offset // ms, (offset + size - 1) // ms + 1)

    def _map_memslots(self, offset: int, size: int, mapped: list[int]) -> None:
        """Map every unmapped memslot overlapping the range in one transaction, recording
        the ones mapped in ``mapped`` (also when a listener failure raises TopologyError)."""
        assert self._container is not None
        with self.region.system.transaction():
            for i in self._memslot_span(offset, size):
                slot = self._memslots[i]
                if slot.container is None:
                    self._container.add_subregion(i * self._memslot_size, slot)
                    mapped.append(i)

    def _unmap_memslots(self, indexes: list[int]) -> None:
        if not indexes:
            return
        assert self._container is not None
        try:
            with self.region.system.transaction():
                for i in indexes:
                    slot = self._memslots[i]
                    if slot.container is not None:
                        self._container.del_subregion(slot)
        except TopologyError:
            log.exception("%s: a memory listener failed while memslots were unmapped", self._prefix)

    def _unmap_unplugged_memslots(self, offset: int, size: int) -> None:
        todo: list[int] = []
        for i in self._memslot_span(offset, size):
            slot = self._memslots[i]
            if slot.container is None:
                continue
            first = (i * self._memslot_size) >> self._shift
            last = first + (slot.size >> self._shift)
            if self._bitmap.all_clear(first, last):
                todo.append(i)
        self._unmap_memslots(todo)

    def _map_plugged_memslots(self, bitmap: Bitmap, mapped: list[int]) -> None:
        """Map every memslot holding a set bit of ``bitmap`` (the load path), recording the
        ones mapped in ``mapped`` (also when a listener failure raises TopologyError)."""
        if not self._dynamic:
            return
        assert self._container is not None
        with self.region.system.transaction():
            for i, slot in enumerate(self._memslots):
                first = (i * self._memslot_size) >> self._shift
                last = first + (slot.size >> self._shift)
                if slot.container is None and not bitmap.all_clear(first, last):
                    self._container.add_subregion(i * self._memslot_size, slot)
                    mapped.append(i)

    # -- usable region, notifiers -----------------------------------------------------------

    def _resize_usable_region(self, requested: int, *, can_shrink: bool) -> None:
        new = (
            0
            if requested == 0
            else min(self._region_size, align_up(requested + self._usable_extent, self._block_size))
        )
        if new < self._usable_region_size and not can_shrink:
            return
        self._usable_region_size = new

    def _fire_config_change(self) -> None:
        for fn in list(self._config_notifiers):
            try:
                fn(self)
            except Exception:
                log.exception("%s: config-change notifier %r failed", self._prefix, fn)

    def _fire_size_change(self) -> None:
        for fn in list(self._size_notifiers):
            try:
                fn(self._id, self.populated_size)
            except Exception:
                log.exception("%s: size-change notifier %r failed", self._prefix, fn)

    # -- RDM queries with virtio-mem semantics ---------------------------------------------

    def is_populated(self, section: MemoryRegionSection) -> bool:
        """True only if every block touched by ``section`` (widened to block boundaries) is
        plugged and inside the usable region; False for empty sections."""
        with self._lock:
            self.check_section(section)
            if section.size == 0:
                return False
            first, last = self._block_span(section.offset_within_region, section.size)
            if last << self._shift > self._usable_region_size:
                return False
            return self._bitmap.all_set(first, last)

    # -- resets, lifetime --------------------------------------------------------------------

    def device_reset(self) -> None:
        """Virtio device reset: clears the broken flag and the negotiated features; block
        state and memory stay exactly as they are (D-INIT-2/3)."""
        with self._lock:
            self._broken = False
            self._driver_features = 0

    def system_reset(self, wakeup: bool = False) -> None:
        """Full system reset: unplug everything and shrink the usable region (D-OP-7),
        then a device reset. A BUSY outcome is ignored (the guest must UNPLUG_ALL later).
        A wake-up reset (resume from suspend) changes nothing (D-OP-8)."""
        if wakeup:
            return
        with self._topology_lock(), self._lock:
            self._check_realized()
            self._check_not_notifying("reset the device")
            self._unplug_all()
            self.device_reset()

    def unplug_check(self) -> None:
        """QEMU's device hot-unplug preconditions; raises InvalidArgument when refused."""
        if not self._unplugged_inaccessible:
            raise InvalidArgument(f"{self._prefix}: unplug requires unplugged-inaccessible=on")
        if self.populated_size or self._requested_size:
            raise InvalidArgument(
                f"{self._prefix}: unplug requires 'size' and 'requested-size' to be 0 "
                f"(size {self.populated_size:#x}, requested-size {self._requested_size:#x})"
            )

    def unrealize(self) -> None:
        """Release everything: memslots, the region's manager, the policy count.

        The device region must already be unmapped (RegionMapped otherwise) and no RDM
        listener may remain (ListenerError); nothing changes when it raises. Idempotent.
        Host memory stays with the RAM block's owner.
        """
        with self.region.system.lock, self._lock:
            if not self._realized:
                return
            self._check_not_notifying("unrealize the device")
            if self.device_region.is_mapped or self._region.is_mapped:
                raise RegionMapped(f"{self._prefix}: unmap the device region before unrealizing")
            if self.listeners:
                raise ListenerError(f"{self._prefix}: RamDiscardListeners are still registered")
            for slot in self._memslots:
                if slot.container is not None:
                    slot.container.del_subregion(slot)
            remove_ram_discard_source(self._region, self)
            self._policy.coordinated_require(False)
            self._realized = False

    close = unrealize

    def __enter__(self) -> VirtioMem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unrealize()

    def _check_realized(self) -> None:
        if not self._realized:
            raise VirtioMemError(f"{self._prefix} is unrealized")

    # -- migration (see persist.py) -------------------------------------------------------------

    def save_state(self) -> bytes:
        from ramdiscard.providers.virtio_mem.persist import save_state

        return save_state(self)

    def load_state(self, data: bytes) -> None:
        from ramdiscard.providers.virtio_mem.persist import load_state

        load_state(self, data)

    def plugged_ranges(self) -> Iterator[tuple[int, int]]:
        """Maximal plugged runs as (region offset, size), ascending."""
        for start, end in self.populated_runs():
            yield start, end - start


def _check_requested(prefix: str, value: int, block_size: int, region_size: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{prefix}: requested-size must be a non-negative integer, got {value!r}")
    if value % block_size:
        raise InvalidArgument(f"{prefix}: requested-size must be a multiple of block-size ({block_size:#x})")
    if value > region_size:
        raise InvalidArgument(f"{prefix}: requested-size cannot exceed the memory backend size")
