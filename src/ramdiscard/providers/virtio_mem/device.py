"""VirtioMem: the virtio-mem device model, the RamDiscardManager of its RAM region.

Rules (qemu-ram-discard §3, virtio-mem.md D-* ids):

* The device is the RamDiscardManager of its region (``register_listener``,
  ``replay_populated``, ``is_populated`` ... on the device). Block state, sizes and the
  answer to every request belong to a :class:`~.state.PlugState` core: plugged = populated,
  ``plugged_size`` is derived from its bitmap. The device only applies effects.
* Realize (the constructor) follows QEMU's order (:mod:`.realize`); any failure releases
  what was taken and raises, nothing stays held.
* Guest requests go through :meth:`VirtioMem.process_queue` (a virtqueue, see
  :mod:`.virtqueue`), :meth:`VirtioMem.handle_request` (bytes) or
  :meth:`VirtioMem.process` (typed); the guest-facing part is :mod:`.frontend`. The
  core decides ERROR / NACK / BUSY / ACK in QEMU's order; an ACK whose effects fail
  becomes BUSY and changes nothing: memory is discarded again, listeners are rolled back
  by the notification engine, memslots unmapped.
* A protocol violation (short request, unknown type, or one the transport reports
  through :meth:`VirtioMem.protocol_violation`) raises :class:`ProtocolError` and
  marks the device broken: every later request raises :class:`DeviceBroken` until
  :meth:`device_reset` or :meth:`system_reset`. No other exception escapes for guest input.
* Effect order of PLUG, UNPLUG, UNPLUG_ALL and restore: :mod:`.effects`.
* Config-change notifiers fire on every ``requested_size`` write, changed or not (the only
  way the usable region grows); never for ``plugged_size`` changes, an UNPLUG_ALL shrink or
  a system reset (D-CFG-9/10/11). Size-change notifiers (QEMU's MEMORY_DEVICE_SIZE_CHANGE
  source) fire after every ``plugged_size`` change. Notifier exceptions are logged, never
  propagated into the request path.
* Device reset changes no block state and no memory (D-INIT-2/3); system reset unplugs
  everything (a BUSY outcome is ignored, as QEMU does) unless it is a wake-up reset.
* State for migration and snapshots: :meth:`save` returns an image (:mod:`.persist`
  codec); :meth:`restore` loads one into a device with nothing plugged, all-or-nothing.

Lock order: the topology lock (only with dynamic memslots), then the manager lock (the
region's discard lock); why memslots are mapped before the populate notification:
:mod:`.effects`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from ramdiscard.errors import ListenerError, RegionMapped
from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.interfaces import Virtqueue
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.providers.virtio_mem import persist
from ramdiscard.providers.virtio_mem.config import USABLE_EXTENT_X86, check_unplug
from ramdiscard.providers.virtio_mem.effects import ConfigChangeFn, Engine, HostDiscardFn, SizeChangeFn
from ramdiscard.providers.virtio_mem.metrics import REQUEST_KEYS, RESPONSE_KEYS, VirtioMemMetrics
from ramdiscard.providers.virtio_mem.plug_manager import PlugStateManager
from ramdiscard.providers.virtio_mem.realize import Props, prepare, realize
from ramdiscard.providers.virtio_mem.state import Action
from ramdiscard.providers.virtio_mem.virtqueue import serve as serve_queue
from ramdiscard.providers.virtio_mem.wire import (
    BlockState,
    ConfigSpace,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMemError,
)
from ramdiscard.rdm.policy import DiscardPolicy

log = logging.getLogger("ramdiscard.providers.virtio_mem")

_NO_LOCK = nullcontext()
"""Stands for the topology lock without dynamic memslots (stateless, so shared)."""
_STATE, _BUSY = RequestType.STATE, ResponseType.BUSY  # enum lookups are slow on the request path
_NONE = Action.NONE
_PLUG, _UNPLUG = RequestType.PLUG, RequestType.UNPLUG
_RESPONSES = {t: Response(t) for t in ResponseType}
"""Responses without a block state are immutable values: one each, shared."""


class VirtioMem(PlugStateManager):
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
        ram, plug = prepare(
            prefix, memory, lambda user: isinstance(user, VirtioMem), addr=addr, block_size=block_size,
            requested_size=requested_size, node=node, numa_nodes=numa_nodes, usable_extent=usable_extent,
            unplugged_inaccessible=unplugged_inaccessible, dynamic_memslots=dynamic_memslots,
        )  # fmt: skip
        super().__init__(memory, plug)
        self._id = id
        self._prefix = prefix
        self._node = node
        self._unplugged_inaccessible = unplugged_inaccessible
        self._busy: Callable[[], bool] | None = busy
        self._realized = False
        props = Props(
            id, numa_nodes > 0, prealloc, unplugged_inaccessible, persistent_suspend, dynamic_memslots,
            memslot_limit,
        )  # fmt: skip
        engine = Engine(self._notify_populate_runs, self._notify_discard_runs, self._notify_discard_all)
        self._parts = parts = realize(
            self, plug, memory, ram, props, prefix=prefix, policy=policy, incoming=incoming,
            execute=self._execute, engine=engine, on_config_change=on_config_change,
            on_size_change=on_size_change, on_host_discard=on_host_discard,
        )  # fmt: skip
        self._frontend, self._effects = parts.frontend, parts.effects
        self._host, self._notifiers, self._memslots = parts.host, parts.notifiers, parts.memslots
        self._metrics, self._prealloc = parts.metrics, parts.prealloc
        self._realized = True

    def __repr__(self) -> str:
        return f"<VirtioMem {self._id!r} addr={self.addr:#x} region={self.region_size:#x}>"

    # -- properties ---------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def node(self) -> int:
        return self._node

    @property
    def ram(self) -> HostRam:
        return self._host.ram

    @property
    def prealloc(self) -> bool:
        return self._prealloc

    @property
    def dynamic_memslots(self) -> bool:
        return self._memslots is not None

    @property
    def realized(self) -> bool:
        return self._realized

    @property
    def realize_discarded(self) -> bool:
        """Whether realize discarded the whole RAM block (not on incoming migration)."""
        return self._parts.realize_discarded

    @property
    def broken(self) -> bool:
        """True after a protocol violation, until a device or system reset."""
        return self._frontend.broken

    @property
    def metrics(self) -> VirtioMemMetrics:
        """The device's counters (see :mod:`.metrics`)."""
        return self._metrics

    @property
    def unplugged_inaccessible(self) -> bool:
        """Whether VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE is offered (and required)."""
        return self._unplugged_inaccessible

    @property
    def requested_size(self) -> int:
        return self._plug.requested_size

    @requested_size.setter
    def requested_size(self, value: int) -> None:
        """Host control: the guest is asked to plug ``value`` bytes.

        Raises ValueError unless it is a multiple of the block size and at most the region
        size. The usable region grows (never shrinks) to fit; config-change notifiers fire
        on every successful write, even if nothing changed (D-CFG-9/11).
        """
        with self.lock:
            self._check_realized()
            self._plug.set_requested(value)
        self._notifiers.config_changed()

    @property
    def host_features(self) -> int:
        """Device feature bits offered to the driver."""
        return self._frontend.offered

    @property
    def driver_features(self) -> int:
        """Features the driver accepted (0 until negotiated, and after a reset)."""
        return self._frontend.accepted

    def set_driver_features(self, features: int) -> None:
        """Feature negotiation. Raises FeatureError (nothing changes) when the driver accepts
        a feature that was not offered or does not accept an offered
        UNPLUGGED_INACCESSIBLE (D-INIT-1: QEMU fails validation)."""
        with self.lock:
            self._frontend.negotiate(features)

    @property
    def device_region(self) -> MemoryRegion:
        """What the machine maps at :attr:`addr`: the RAM region itself, or with dynamic
        memslots the container of memslot aliases."""
        return self._memslots.container if self._memslots is not None else self.region

    @property
    def memslot_size(self) -> int:
        return self._parts.memslot_size

    @property
    def nb_memslots(self) -> int:
        return self._parts.nb_memslots

    @property
    def mapped_memslots(self) -> int:
        """Memslots currently mapped into the container (0 without dynamic memslots)."""
        return self._memslots.mapped if self._memslots is not None else 0

    def config(self) -> ConfigSpace:
        with self.lock:
            return self._plug.config(self._node)

    def config_bytes(self) -> bytes:
        """The 56-byte config space as the driver reads it."""
        return self.config().pack()

    def config_write(self, offset: int, data: bytes) -> None:
        """A driver write to the config space: ignored (all fields read-only, R-CFG-1)."""
        with self.lock:
            self._metrics.config_writes_ignored += 1

    # -- notifiers ----------------------------------------------------------------------

    def add_config_change_notifier(self, fn: ConfigChangeFn) -> None:
        self._notifiers.config.append(fn)

    def remove_config_change_notifier(self, fn: ConfigChangeFn) -> None:
        self._notifiers.config.remove(fn)

    def add_size_change_notifier(self, fn: SizeChangeFn) -> None:
        self._notifiers.size.append(fn)

    def remove_size_change_notifier(self, fn: SizeChangeFn) -> None:
        self._notifiers.size.remove(fn)

    def add_host_discard_hook(self, fn: HostDiscardFn) -> None:
        self._host.hooks.append(fn)

    def remove_host_discard_hook(self, fn: HostDiscardFn) -> None:
        self._host.hooks.remove(fn)

    @property
    def busy_predicate(self) -> Callable[[], bool] | None:
        """The installed busy predicate (None: never busy); see :meth:`set_busy_predicate`."""
        return self._busy

    def set_busy_predicate(self, busy: Callable[[], bool] | None) -> None:
        """Install the predicate that says a migration/snapshot is running (None: never)."""
        with self.lock:
            self._busy = busy

    def is_busy(self) -> bool:
        fn = self._busy
        return bool(fn()) if fn is not None else False

    def _topology_lock(self) -> AbstractContextManager[object]:
        """Taken *before* the device lock on every path that can map or unmap memslots.

        A topology update holds the topology lock and calls into the device (a memory
        listener registering a RamDiscardListener from ``region_add``), so taking the
        device lock first and then the topology lock could deadlock (QEMU holds the BQL
        for both). Without dynamic memslots requests never touch the topology.
        """
        return self.region.system.lock if self._memslots is not None else _NO_LOCK

    # -- the request path -----------------------------------------------------------------

    def handle_request(self, request: bytes | bytearray | memoryview) -> bytes:
        """Process one guest request and return the 10-byte response.

        Raises ProtocolError for a short request or unknown type (the device is then
        broken) and DeviceBroken while broken; nothing else for any byte string.
        """
        if self._memslots is None:
            with self._lock:
                return self._frontend.handle(request)
        with self.region.system.lock, self._lock:
            return self._frontend.handle(request)

    def process(self, req: Request) -> Response:
        """Process a parsed request (the typed path). Raises DeviceBroken while broken."""
        with self._topology_lock(), self.lock:
            return self._frontend.process(req)

    def process_queue(self, vq: Virtqueue) -> int:
        """Queue-notify handler: serve every available element of ``vq``; see
        :func:`ramdiscard.providers.virtio_mem.virtqueue.serve`."""
        return serve_queue(self, vq)

    def protocol_violation(self, reason: str) -> ProtocolError:
        """Record a violation a transport found (e.g. a response buffer too small): the
        device is broken until reset and nothing else changes. Returns the error to raise."""
        with self.lock:
            return self._frontend.violation(reason)

    def plug(self, addr: int, nb_blocks: int) -> ResponseType:
        return self.process(Request(RequestType.PLUG, addr, nb_blocks)).type

    def unplug(self, addr: int, nb_blocks: int) -> ResponseType:
        return self.process(Request(RequestType.UNPLUG, addr, nb_blocks)).type

    def unplug_all(self) -> ResponseType:
        return self.process(Request(RequestType.UNPLUG_ALL)).type

    def state(self, addr: int, nb_blocks: int) -> tuple[ResponseType, BlockState | None]:
        resp = self.process(Request(RequestType.STATE, addr, nb_blocks))
        return resp.type, resp.state

    def _execute(self, rtype: RequestType, addr: int, nb_blocks: int) -> Response:
        if not self._realized:
            self._check_realized()
        if self._notifier._thread is not None or self._sink is not None:
            self._check_not_notifying("process a virtio-mem request")
        metrics = self._metrics
        metrics.requests[REQUEST_KEYS[rtype]] += 1
        fn = self._busy
        busy = fn is not None and rtype is not _STATE and bool(fn())
        if rtype is _PLUG:
            decision = self._plug.decide_plug(addr, nb_blocks, busy)
        elif rtype is _UNPLUG:
            decision = self._plug.decide_unplug(addr, nb_blocks, busy)
        else:
            decision = self._plug.decide_fields(rtype, addr, nb_blocks, busy)
        response = decision.response
        if response is _BUSY:
            metrics.busy_count += 1
        if decision.action is not _NONE:
            response = self._effects.carry_out(decision, self._prealloc)
        metrics.responses[RESPONSE_KEYS[response]] += 1
        state = decision.state
        return _RESPONSES[response] if state is None else Response(response, state)

    # -- resets, lifetime --------------------------------------------------------------------

    def device_reset(self) -> None:
        """Virtio device reset: clears the broken flag and the negotiated features; block
        state and memory stay exactly as they are (D-INIT-2/3)."""
        with self.lock:
            self._frontend.reset()

    def system_reset(self, wakeup: bool = False) -> None:
        """Full system reset: unplug everything and shrink the usable region (D-OP-7),
        then a device reset. A BUSY outcome is ignored (the guest must UNPLUG_ALL later).
        A wake-up reset (resume from suspend) changes nothing (D-OP-8)."""
        if wakeup:
            return
        with self._topology_lock(), self.lock:
            self._check_realized()
            self._check_not_notifying("reset the device")
            decision = self._plug.decide_unplug_all(self.is_busy())
            if decision.response is ResponseType.BUSY:
                self._metrics.busy_count += 1
            self._effects.carry_out(decision)
            self.device_reset()

    def unplug_check(self) -> None:
        """QEMU's device hot-unplug preconditions; raises InvalidArgument when refused."""
        check_unplug(self._prefix, self._unplugged_inaccessible, self.plugged_size, self.requested_size)

    def unrealize(self) -> None:
        """Release everything: memslots, the region's manager, the policy count.

        The device region must already be unmapped (RegionMapped otherwise) and no RDM
        listener may remain (ListenerError); nothing changes when it raises. Idempotent.
        Host memory stays with the RAM block's owner.
        """
        with self.region.system.lock, self.lock:
            if not self._realized:
                return
            self._check_not_notifying("unrealize the device")
            if self.device_region.is_mapped or self.region.is_mapped:
                raise RegionMapped(f"{self._prefix}: unmap the device region before unrealizing")
            if self.listeners:
                raise ListenerError(f"{self._prefix}: RamDiscardListeners are still registered")
            self._parts.release(self)
            self._realized = False

    close = unrealize

    def __enter__(self) -> VirtioMem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unrealize()

    def _check_realized(self) -> None:
        if not self._realized:
            raise VirtioMemError(f"{self._prefix} is unrealized")

    # -- state for migration and snapshots ---------------------------------------------------

    def save(self) -> bytes:
        """The device state as a self-checking image (:mod:`.persist` format)."""
        with self.lock:
            return persist.encode_state(self._plug.image(self._node))

    def restore(self, image: bytes | bytearray | memoryview, *, incoming_postcopy: bool = False) -> None:
        """Load an image into this device, which must have nothing plugged.

        All-or-nothing: a corrupt image, one whose addr/region/block size/node differ from
        this device's, or one that does not fit the plug-state rules raises StateError
        before anything changes. Then unplugged ranges are discarded again, plugged ones
        preallocated (``prealloc``), memslots holding plugged blocks mapped and populate
        notified per plugged run; a failure there is undone and raises StateError.
        ``incoming_postcopy`` (QEMU's post_load rules while pages still arrive): unplugged
        ranges are not discarded again and nothing is preallocated (a touch would fault).
        """
        state = persist.decode_state(image)
        with self._topology_lock(), self.lock:
            self._check_realized()
            self._check_not_notifying("load device state")
            persist.check_sanity(state, self._plug.sanity(self._node), f"device {self._id!r}")
            plan = self._plug.plan_restore(state)
            self._effects.restore(plan, self._prealloc, incoming_postcopy=incoming_postcopy)

    save_state = save
    load_state = restore
