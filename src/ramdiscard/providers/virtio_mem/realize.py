"""Realizing a virtio-mem device: building its collaborators and claiming its region.

Rules (QEMU's ``virtio_mem_device_realize`` order):

* :func:`realize` is called after the property checks (:mod:`.config`) with the device,
  already a RamDiscardManager of ``memory``'s region, and its plug-state core. It builds the
  request front end, the host-memory, notifier and memslot wrappers and the effects, then
  claims the region (:func:`~.effects.claim_region`): ``coordinated_require``
  ("Discarding RAM is disabled"), become the region's manager (or a source of its
  aggregate), discard the whole RAM block unless an incoming migration is pending.
* Memslot aliases are created only after the claim succeeded; whatever fails releases
  what was claimed and raises, so nothing stays held.
* On hugetlb memory an unpopulated page faults in from the pool on the guest's first
  touch, and an empty pool ends the process with SIGBUS; populating at plug time turns
  that into a BUSY answer, so hugetlb memory always preallocates (:attr:`Parts.prealloc`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.providers.virtio_mem.config import (
    check_memdev,
    check_properties,
    host_features,
    memslot_geometry,
)
from ramdiscard.providers.virtio_mem.effects import (
    ConfigChangeFn,
    Effects,
    Engine,
    HostDiscardFn,
    HostMemory,
    Memslots,
    Notifiers,
    SizeChangeFn,
    claim_region,
    release_region,
)
from ramdiscard.providers.virtio_mem.frontend import Execute, Frontend
from ramdiscard.providers.virtio_mem.metrics import VirtioMemMetrics
from ramdiscard.providers.virtio_mem.state import PlugState
from ramdiscard.rdm.manager import RamDiscardManager
from ramdiscard.rdm.policy import DiscardPolicy, policy_of


@dataclass(frozen=True, slots=True)
class Props:
    """The checked device properties :func:`realize` needs (see ``VirtioMem``'s arguments)."""

    id: str
    numa: bool
    prealloc: bool
    unplugged_inaccessible: bool
    persistent_suspend: bool
    dynamic_memslots: bool
    memslot_limit: int | None


@dataclass(frozen=True, slots=True)
class Parts:
    """What a realized device is made of."""

    prealloc: bool
    metrics: VirtioMemMetrics
    frontend: Frontend
    host: HostMemory
    notifiers: Notifiers
    policy: DiscardPolicy
    realize_discarded: bool
    memslot_size: int
    nb_memslots: int
    memslots: Memslots | None
    effects: Effects

    def release(self, manager: RamDiscardManager) -> None:
        """Undo the claim (memslots, the region's manager, the policy count)."""
        release_region(manager, self.policy, self.memslots)


def prepare(
    prefix: str,
    memory: MemoryRegion,
    is_device: Callable[[object], bool],
    *,
    addr: int,
    block_size: int | None,
    requested_size: int,
    node: int,
    numa_nodes: int,
    usable_extent: int,
    unplugged_inaccessible: bool,
    dynamic_memslots: bool,
) -> tuple[HostRam, PlugState]:
    """Check the memory backend and the properties (:func:`~.config.check_memdev`,
    :func:`~.config.check_properties`: InvalidArgument, nothing taken) and build the
    plug-state core; returns the RAM block and the core."""
    ram = check_memdev(prefix, memory, is_device)  # also that ``memory`` is a RAM region
    size = memory.size
    checked = check_properties(
        prefix,
        page_size=ram.page_size,
        region_size=size,
        addr=addr,
        block_size=block_size,
        requested_size=requested_size,
        node=node,
        numa_nodes=numa_nodes,
        unplugged_inaccessible=unplugged_inaccessible,
        dynamic_memslots=dynamic_memslots,
        usable_extent=usable_extent,
    )
    plug = PlugState(
        addr=addr,
        region_size=size,
        block_size=checked,
        usable_extent=usable_extent,
        requested_size=requested_size,
        name=prefix,
    )
    return ram, plug


def realize(
    device: RamDiscardManager,
    plug: PlugState,
    memory: MemoryRegion,
    ram: HostRam,
    props: Props,
    *,
    prefix: str,
    policy: DiscardPolicy | None,
    incoming: bool,
    execute: Execute,
    engine: Engine,
    on_config_change: ConfigChangeFn | None,
    on_size_change: SizeChangeFn | None,
    on_host_discard: HostDiscardFn | None,
) -> Parts:
    """Build and claim everything ``device`` (over the core ``plug``) needs (module rules).
    ``execute`` answers a
    parsed request (its fields), ``engine`` reaches the device's listeners. Raises what the claim
    raises (DiscardPolicyError, ManagerBusy, RegionMapped, InvalidArgument, the host's
    error); nothing is held then."""
    features = host_features(
        numa=props.numa,
        unplugged_inaccessible=props.unplugged_inaccessible,
        persistent_suspend=props.persistent_suspend,
    )
    metrics = VirtioMemMetrics()
    host = HostMemory(ram, prefix, metrics)
    if on_host_discard:
        host.hooks.append(on_host_discard)
    notifiers = Notifiers(device, prefix, on_config_change, on_size_change)
    policy = policy if policy is not None else policy_of(memory.system)
    discarded = claim_region(device, policy, host, discard=not incoming, prefix=prefix)
    slot_size, nb_slots, memslots = memory.size, 1, None
    if props.dynamic_memslots:
        try:
            slot_size, nb_slots = memslot_geometry(memory.size, plug.block_size, props.memslot_limit)
            memslots = Memslots(props.id, memory, slot_size, nb_slots, prefix)
        except BaseException:
            release_region(device, policy, None)
            raise
    effects = Effects(plug, host, memslots, engine, metrics, notifiers, prefix)
    return Parts(
        prealloc=props.prealloc or bool(getattr(ram, "hugetlb", False)),
        metrics=metrics,
        frontend=Frontend(prefix, features, metrics, execute),
        host=host,
        notifiers=notifiers,
        policy=policy,
        realize_discarded=discarded,
        memslot_size=slot_size,
        nb_memslots=nb_slots,
        memslots=memslots,
        effects=effects,
    )
