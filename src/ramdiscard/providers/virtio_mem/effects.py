"""The effects a virtio-mem device applies: host memory, dynamic memslots, listeners.

Rules:

* :class:`Effects` carries out a :class:`~.state.Decision` of the plug-state core in the
  documented order and applies it to the core only when every effect succeeded:

  1. PLUG: prealloc (``ram.populate``) when enabled; map the memslots overlapping the
     range (one topology transaction); populate notification (all-or-nothing, the
     engine rolls back on a refusal); apply; size-change notifiers. A failure at 1-3
     undoes 1-2 (memslots unmapped, memory discarded again) and answers BUSY.
  2. UNPLUG: host discard (failure: BUSY, nothing changed); discard notification to
     every listener (failures logged, the memory is gone); apply; unmap memslots left
     without plugged blocks; size-change notifiers.
  3. UNPLUG_ALL: with nothing plugged only apply (the usable region shrinks). Otherwise
     discard the whole RAM block (failure: BUSY); discard-all notification (failures
     logged); apply; size-change notifiers; unmap emptied memslots.
  4. Restore (:meth:`Effects.restore`): discard unplugged runs, prealloc plugged runs,
     map memslots holding plugged blocks, populate notification of the plugged runs;
     any failure undoes the earlier steps and raises StateError; then commit to the core
     and fire size-change notifiers if anything is plugged.

* :class:`HostMemory` wraps the RAM block. ``discard`` returns False (counted as a host
  failure, logged) instead of raising when the host refuses; after every successful
  discard the host-discard hooks run (their exceptions are logged). ``populate`` raises
  what the host raised; the first failure is logged as a warning, later ones are not.
* :class:`Memslots` owns the memslot aliases and their container (dynamic memslots). A
  memslot is mapped while it holds a plugged block. ``map_range`` maps, in one topology
  transaction, every unmapped memslot overlapping a range and records each one it mapped
  in the caller's list, also when a memory listener fails and TopologyError propagates,
  so the caller can undo exactly what was mapped. ``unmap`` never raises for a listener
  failure (logged): it runs on undo and unplug paths, where the memory is already gone.

Theory of operation: :class:`HostMemory` and :class:`Memslots` know no block state; the
ranges and the predicate "this byte range holds no plugged block" come from the plug-state
core, which only :class:`Effects` updates. Listeners are reached only through the
manager's notification engine (:class:`Engine`). The caller holds the topology lock
(taken before the device lock) around everything that may map or unmap memslots.
Memslots are mapped *before* the populate notification, while the core does not yet hold
the new blocks: an RDM listener that registers during the mapping replays the old state
and then receives the regular notification, so every block is announced exactly once
(also on restore).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ramdiscard.errors import DiscardPolicyError, InvalidArgument, ManagerBusy, RegionMapped
from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.system import TopologyError
from ramdiscard.providers.virtio_mem.metrics import VirtioMemMetrics
from ramdiscard.providers.virtio_mem.persist import StateError
from ramdiscard.providers.virtio_mem.state import Action, Decision, PlugState, RestorePlan, Run
from ramdiscard.providers.virtio_mem.wire import ResponseType
from ramdiscard.rdm.aggregate import add_ram_discard_source, remove_ram_discard_source
from ramdiscard.rdm.manager import RamDiscardManager
from ramdiscard.rdm.policy import DiscardPolicy

log = logging.getLogger("ramdiscard.providers.virtio_mem")

HostDiscardFn = Callable[[int, int], None]
"""Called with (region offset, length) after every successful host discard."""
ConfigChangeFn = Callable[[Any], None]
"""Called with the device after every ``requested_size`` write."""
SizeChangeFn = Callable[[str, int], None]
"""Called with (device id, new plugged size)."""


# Enum member lookups cost a class-attribute walk each; the request path uses these names.
_PLUG, _UNPLUG, _UNPLUG_ALL = Action.PLUG, Action.UNPLUG, Action.UNPLUG_ALL
_ACK, _BUSY = ResponseType.ACK, ResponseType.BUSY


class Notifiers:
    """The device's config-change and size-change notifiers; exceptions are logged."""

    def __init__(
        self, device: Any, prefix: str, config: ConfigChangeFn | None, size: SizeChangeFn | None
    ) -> None:
        self.config: list[ConfigChangeFn] = [config] if config else []
        self.size: list[SizeChangeFn] = [size] if size else []
        self._device = device
        self._prefix = prefix

    def config_changed(self) -> None:
        for fn in list(self.config):
            try:
                fn(self._device)
            except Exception:
                log.exception("%s: config-change notifier %r failed", self._prefix, fn)

    def size_changed(self) -> None:
        if not self.size:
            return
        for fn in list(self.size):
            try:
                fn(self._device.id, self._device.plugged_size)
            except Exception:
                log.exception("%s: size-change notifier %r failed", self._prefix, fn)


class HostMemory:
    """The RAM block behind the device, with failure accounting (module rules)."""

    def __init__(self, ram: HostRam, prefix: str, metrics: VirtioMemMetrics) -> None:
        self.ram = ram
        self.hooks: list[HostDiscardFn] = []
        self._prefix = prefix
        self._metrics = metrics
        self._populate_warned = False

    def discard(self, offset: int, size: int) -> bool:
        """Discard the range; False (nothing to undo) if the host refused."""
        try:
            self.ram.discard_range(offset, size)
        except Exception as exc:
            self.discard_failed(offset, size, exc)
            return False
        if self.hooks:
            self.run_hooks(offset, size)
        return True

    def discard_failed(self, offset: int, size: int, exc: Exception) -> None:
        """Account a discard the host refused (logged, counted as a host failure)."""
        log.warning("%s: discarding [%#x, +%#x) failed: %s", self._prefix, offset, size, exc)
        self._metrics.host_failures += 1

    def run_hooks(self, offset: int, size: int) -> None:
        if not self.hooks:
            return
        for hook in list(self.hooks):
            try:
                hook(offset, size)
            except Exception:
                log.exception("%s: host-discard hook %r failed", self._prefix, hook)

    def prealloc(self, offset: int, size: int) -> bool:
        """Populate the range; on failure discard it again (best effort) and return False."""
        try:
            self.ram.populate(offset, size)
        except Exception as exc:
            if not self._populate_warned:
                log.warning("%s: preallocation of [%#x, +%#x) failed: %s", self._prefix, offset, size, exc)
                self._populate_warned = True
            self._metrics.host_failures += 1
            self.discard(offset, size)
            return False
        return True


class Memslots:
    """``count`` memslot aliases of ``memory`` of ``slot_size`` bytes in a container."""

    def __init__(self, name: str, memory: MemoryRegion, slot_size: int, count: int, prefix: str) -> None:
        self.slot_size = slot_size
        self.container = MemoryRegion.new_container(f"{name}-memslots", memory.size, system=memory.system)
        self._system = memory.system
        self.slots: list[MemoryRegion] = []
        self._prefix = prefix
        for i in range(count):
            start = i * slot_size
            size = min(slot_size, memory.size - start)
            alias = MemoryRegion.new_alias(f"{name}-memslot-{i}", memory, start, size, unmergeable=True)
            self.slots.append(alias)

    @property
    def mapped(self) -> int:
        return sum(1 for m in self.slots if m.container is not None)

    def _span(self, offset: int, size: int) -> range:
        ms = self.slot_size
        return range(offset // ms, (offset + size - 1) // ms + 1)

    def map_range(self, offset: int, size: int, mapped: list[int]) -> None:
        """Map the unmapped memslots overlapping the range (module rules)."""
        with self._system.transaction():
            for i in self._span(offset, size):
                slot = self.slots[i]
                if slot.container is None:
                    self.container.add_subregion(i * self.slot_size, slot)
                    mapped.append(i)

    def map_where(self, holds_plugged: Callable[[int, int], bool], mapped: list[int]) -> None:
        """Map every unmapped memslot for which ``holds_plugged(offset, size)`` is true,
        recording them in ``mapped`` as :meth:`map_range` does."""
        with self._system.transaction():
            for i, slot in enumerate(self.slots):
                if slot.container is None and holds_plugged(i * self.slot_size, slot.size):
                    self.container.add_subregion(i * self.slot_size, slot)
                    mapped.append(i)

    def unmap(self, indexes: list[int]) -> None:
        if not indexes:
            return
        try:
            with self._system.transaction():
                for i in indexes:
                    slot = self.slots[i]
                    if slot.container is not None:
                        self.container.del_subregion(slot)
        except TopologyError:
            log.exception("%s: a memory listener failed while memslots were unmapped", self._prefix)

    def unmap_free(self, offset: int, size: int, free: Callable[[int, int], bool]) -> None:
        """Unmap the mapped memslots overlapping the range for which ``free(offset, size)``
        (no plugged block) holds."""
        todo = [
            i
            for i in self._span(offset, size)
            if self.slots[i].container is not None and free(i * self.slot_size, self.slots[i].size)
        ]
        self.unmap(todo)

    def release(self) -> None:
        """Unmap every memslot (unrealize); listener failures propagate."""
        for slot in self.slots:
            if slot.container is not None:
                slot.container.del_subregion(slot)


@dataclass(frozen=True, slots=True)
class Engine:
    """The notification engine as the device's manager exposes it (region offsets)."""

    populate: Callable[[Sequence[Run]], None]
    """All-or-nothing populate of the runs; raises a listener's refusal after rollback."""
    discard: Callable[[Sequence[Run]], None]
    """Discard to every listener; raises the collected failures afterwards."""
    discard_all: Callable[[list[Run]], None]
    """Everything discarded; the argument is the plugged runs before."""


class Effects:
    """Carries out the core's decisions (module rules). Call with the device's locks held
    (topology lock first when ``memslots`` is set)."""

    def __init__(
        self,
        core: PlugState,
        host: HostMemory,
        memslots: Memslots | None,
        engine: Engine,
        metrics: VirtioMemMetrics,
        notifiers: Notifiers,
        prefix: str,
    ) -> None:
        self.core = core
        self.host = host
        self.memslots = memslots
        self._engine = engine
        self._metrics = metrics
        self._size_changed = notifiers.size_changed
        self._size_fns = notifiers.size  # checked before the call: usually empty
        self._prefix = prefix

    def carry_out(self, decision: Decision, prealloc: bool = False) -> ResponseType:
        """The final answer for ``decision``: its response, or BUSY if an effect failed.
        ``prealloc``: populate host memory before plugging."""
        action = decision.action
        if action is _PLUG:
            offset, size = decision.offset, decision.size
            if prealloc or self.memslots is not None:
                if not self._plug(offset, size, prealloc):
                    return _BUSY
            else:
                # _plug() without prealloc and memslots, inline (the request path).
                try:
                    self._engine.populate(((offset, size),))
                except Exception as exc:
                    self._refused(offset, size, exc, [])
                    return _BUSY
            self.core.apply(decision)
            self._metrics.plugged_bytes += size
            if self._size_fns:
                self._size_changed()
        elif action is _UNPLUG:
            offset, size = decision.offset, decision.size
            host = self.host
            try:  # host.discard() inline (the request path)
                host.ram.discard_range(offset, size)
            except Exception as exc:
                host.discard_failed(offset, size, exc)
                return _BUSY
            if host.hooks:
                host.run_hooks(offset, size)
            try:
                self._engine.discard(((offset, size),))
            except Exception:
                log.exception("%s: a listener failed a discard notification", self._prefix)
            finally:
                self.core.apply(decision)
            if self.memslots is not None:
                self.memslots.unmap_free(offset, size, self.core.all_unplugged)
            self._metrics.unplugged_bytes += size
            if self._size_fns:
                self._size_changed()
        elif action is _UNPLUG_ALL:
            return self._unplug_all(decision)
        return decision.response

    def _plug(self, offset: int, size: int, prealloc: bool) -> bool:
        if prealloc and not self.host.prealloc(offset, size):
            return False
        mapped: list[int] = []
        try:
            if self.memslots is not None:
                self.memslots.map_range(offset, size, mapped)
            self._engine.populate(((offset, size),))
        except Exception as exc:
            self._refused(offset, size, exc, mapped)
            return False
        return True

    def _refused(self, offset: int, size: int, exc: Exception, mapped: list[int]) -> None:
        """Undo a plug whose memslot mapping or populate notification failed: unmap the
        memslots it mapped, discard the memory again (prealloc'd or not)."""
        if isinstance(exc, TopologyError):
            log.warning("%s: mapping memslots for [%#x, +%#x) failed: %s", self._prefix, offset, size, exc)
        else:
            log.info("%s: populate of [%#x, +%#x) refused: %r", self._prefix, offset, size, exc)
        self._metrics.listener_refusals += 1
        if self.memslots is not None:
            self.memslots.unmap(mapped)
        self.host.discard(offset, size)

    def _unplug_all(self, decision: Decision) -> ResponseType:
        plugged = decision.size
        if not plugged:
            self.core.apply(decision)
            return _ACK
        if not self.host.discard(0, self.host.ram.size):
            return _BUSY
        try:
            self._engine.discard_all(self.core.plugged_runs())
        except Exception:
            log.exception("%s: a listener failed a discard notification", self._prefix)
        finally:
            self.core.apply(decision)
        self._metrics.unplugged_bytes += plugged
        self._size_changed()
        if self.memslots is not None:
            self.memslots.unmap_free(0, self.core.region_size, self.core.all_unplugged)
        return _ACK

    def restore(self, plan: RestorePlan, prealloc: bool = False, *, incoming_postcopy: bool = False) -> None:
        """Apply a checked restore plan (module rules); StateError with nothing changed.
        ``incoming_postcopy``: no discard of unplugged ranges, no preallocation."""
        ram = self.host.ram
        try:
            for offset, size in [] if incoming_postcopy else plan.unplugged:
                ram.discard_range(offset, size)
        except Exception as exc:
            raise StateError(f"virtio-mem load: discarding unplugged memory failed: {exc}") from exc
        if prealloc and not incoming_postcopy:
            try:
                for offset, size in plan.plugged:
                    ram.populate(offset, size)
            except Exception as exc:
                self._discard_quietly(plan.plugged)
                raise StateError(f"virtio-mem load: preallocation failed: {exc}") from exc
        mapped: list[int] = []
        try:
            if self.memslots is not None:
                self.memslots.map_where(plan.holds_plugged, mapped)
            self._engine.populate(plan.plugged)  # all-or-nothing: a refusal is rolled back
        except Exception as exc:
            if self.memslots is not None:
                self.memslots.unmap(mapped)
            self._discard_quietly(plan.plugged)
            raise StateError(f"virtio-mem load: a listener refused the restored memory: {exc!r}") from exc
        self.core.commit_restore(plan)
        if plan.plugged:
            self._size_changed()

    def _discard_quietly(self, runs: list[Run]) -> None:
        for offset, size in runs:
            self.host.discard(offset, size)


def claim_region(
    manager: RamDiscardManager, policy: DiscardPolicy, host: HostMemory, *, discard: bool, prefix: str
) -> bool:
    """Realize-time claims in QEMU's order: count a coordinated discarder in ``policy``
    ("Discarding RAM is disabled" otherwise), make ``manager`` the manager (or a source of
    the aggregate) of its region, then, if ``discard``, discard the whole RAM block and
    run the host-discard hooks. Returns whether it discarded. Whatever fails releases
    what was claimed and raises (DiscardPolicyError, ManagerBusy, RegionMapped,
    InvalidArgument, or the host's error)."""
    try:
        policy.coordinated_require(True)
    except DiscardPolicyError as exc:
        raise DiscardPolicyError(f"{prefix}: Discarding RAM is disabled") from exc
    try:
        try:
            add_ram_discard_source(manager.region, manager)
        except (ManagerBusy, RegionMapped, InvalidArgument) as exc:
            raise type(exc)(f"{prefix}: Failed to set RamDiscardManager: {exc}") from exc
        try:
            if discard:
                host.ram.discard_range(0, host.ram.size)
                host.run_hooks(0, host.ram.size)
        except BaseException:
            remove_ram_discard_source(manager.region, manager)
            raise
    except BaseException:
        policy.coordinated_require(False)
        raise
    return discard


def release_region(manager: RamDiscardManager, policy: DiscardPolicy, memslots: Memslots | None) -> None:
    """Undo :func:`claim_region` (and unmap every memslot first)."""
    if memslots is not None:
        memslots.release()
    remove_ram_discard_source(manager.region, manager)
    policy.coordinated_require(False)
