"""RamBlockRegistry: the list of live RAM blocks, and who is told when it changes.

Rules:

* A registry belongs to one memory system and holds RAM regions of that system that have
  a RAM block (a region of another system is refused). Each system has one *system
  registry* (:func:`registry_of`, QEMU's ``ram_list``; :func:`default_registry` is the
  default system's): it holds every RAM region ever created in its system by
  :meth:`MemoryRegion.new_ram <ramdiscard.memory.MemoryRegion.new_ram>`, including those
  created before it was first asked for. Other registries are filled with
  :meth:`RamBlockRegistry.add`.
* A region is in a registry at most once. :meth:`RamBlockRegistry.remove` refuses a region
  that is mapped into an address space (QEMU cannot free a RAMBlock whose region is in
  use). A registry holds its regions weakly: a region that nobody else references
  disappears from it when it is collected, without an event (a notifier that keeps state
  for a block keeps the region alive, so it never misses one).
* Notifiers see the events of :mod:`ramdiscard.ramblocks.notifier`, in registration order
  (removal-type events in reverse order). :meth:`RamBlockRegistry.add_notifier` replays
  ``added`` (then ``mapped`` if mapped) for every block, oldest first; if the notifier
  raises, the blocks already replayed get ``unmapped``/``removed`` again, the notifier is
  not registered and the exception propagates. :meth:`RamBlockRegistry.remove_notifier`
  sends ``unmapped``/``removed`` for every block, newest first.
* Event sources are the hooks the memory system owns: its RAM-region observers (created:
  added, for the system registry; manager changed), the block's ``resize_hooks``
  (resized, for blocks that have them), and a mapping observer (mapped/unmapped),
  installed only while the registry has notifiers, so a registry without notifiers costs
  nothing on topology changes.
* Everything runs under the system's topology lock, the model's big lock.
"""

from __future__ import annotations

import functools
import logging
import weakref

from ramdiscard.errors import InvalidArgument, ListenerError, RegionMapped
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.system import MemorySystem, RegionHandle, default_system
from ramdiscard.ramblocks.block import LiveBlock
from ramdiscard.ramblocks.notifier import RamBlockNotifier

log = logging.getLogger("ramdiscard.ramblocks")


class BlockRegistered(InvalidArgument):
    """The region is already in this registry."""


class RamBlockRegistry:
    """Live RAM blocks of ``system`` (default: the default system) and their notifiers;
    see the module rules."""

    def __init__(self, name: str = "ram-blocks", *, system: MemorySystem | None = None) -> None:
        self.name = name
        self.system = system if system is not None else default_system()
        self._refs: dict[int, weakref.ref[MemoryRegion]] = {}
        self._notifiers: list[RamBlockNotifier] = []
        self._joins_new = False
        self.system.add_ram_observer(self)

    def __repr__(self) -> str:
        return f"<RamBlockRegistry {self.name!r} blocks={len(self._refs)}>"

    # -- blocks ---------------------------------------------------------------------

    def blocks(self) -> list[LiveBlock]:
        """The live blocks, oldest first."""
        with self.system.lock:
            return [LiveBlock(mr) for mr in self._regions()]

    def __contains__(self, mr: object) -> bool:
        ref = self._refs.get(id(mr))
        return ref is not None and ref() is mr

    def add(self, mr: MemoryRegion) -> LiveBlock:
        """Register the RAM region ``mr`` and tell every notifier (added, then mapped if it
        is mapped already).

        Raises InvalidArgument if ``mr`` is not a RAM region with a RAM block or belongs to
        another memory system, and BlockRegistered if it is registered here already;
        nothing changes then.
        """
        with self.system.lock:
            if not mr.is_ram or mr.ram is None:
                raise InvalidArgument(f"{mr!r} is not a RAM region with a RAM block")
            if mr.system is not self.system:
                raise InvalidArgument(
                    f"{mr!r} belongs to memory system {mr.system.name!r}, {self!r} to {self.system.name!r}"
                )
            if mr in self:
                raise BlockRegistered(f"RAM block of {mr.name!r} is already registered with {self!r}")
            key = id(mr)
            self._refs[key] = weakref.ref(mr, functools.partial(self._collected, key))
            hooks = getattr(mr.ram, "resize_hooks", None)
            if isinstance(hooks, list):
                hooks.append(_ResizeHook(self, mr))
            block = LiveBlock(mr)
            self._dispatch("ram_block_added", block)
            if mr.is_mapped:
                self._dispatch("ram_block_mapped", block)
            return block

    def remove(self, mr: MemoryRegion) -> None:
        """Unregister ``mr``; every notifier gets ``removed`` (newest notifier first).

        Raises InvalidArgument if it is not registered here, RegionMapped if it is mapped
        into an address space; nothing changes then.
        """
        with self.system.lock:
            if mr not in self:
                raise InvalidArgument(f"{mr!r} is not registered with {self!r}")
            if mr.is_mapped:
                names = ", ".join(repr(s.name) for s in mr.mapped_in())
                raise RegionMapped(f"RAM block of {mr.name!r} cannot be removed: it is mapped into {names}")
            del self._refs[id(mr)]
            hooks = getattr(mr.ram, "resize_hooks", None)
            if isinstance(hooks, list):
                hooks[:] = [h for h in hooks if not (isinstance(h, _ResizeHook) and h.owns(self, mr))]
            self._dispatch("ram_block_removed", LiveBlock(mr), reverse=True)

    # -- notifiers ------------------------------------------------------------------

    @property
    def notifiers(self) -> tuple[RamBlockNotifier, ...]:
        return tuple(self._notifiers)

    def add_notifier(self, notifier: RamBlockNotifier) -> None:
        """Register ``notifier`` and replay every block to it (see the module rules).

        Raises ListenerError if it is registered here already; otherwise whatever the
        notifier raised during the replay, after undoing what it was told.
        """
        with self.system.lock:
            if any(n is notifier for n in self._notifiers):
                raise ListenerError(f"{notifier!r} is already registered with {self!r}")
            done: list[tuple[LiveBlock, bool]] = []
            try:
                for mr in self._regions():
                    block = LiveBlock(mr)
                    notifier.ram_block_added(block)
                    done.append((block, False))
                    if mr.is_mapped:
                        notifier.ram_block_mapped(block)
                        done[-1] = (block, True)
            except BaseException:
                for block, mapped in reversed(done):
                    if mapped:
                        _call_quietly(notifier, "ram_block_unmapped", block)
                    _call_quietly(notifier, "ram_block_removed", block)
                raise
            self._notifiers.append(notifier)
            if len(self._notifiers) == 1:
                self.system.add_mapping_observer(self._mapping_changed)

    def remove_notifier(self, notifier: RamBlockNotifier) -> None:
        """Unregister ``notifier``, sending it ``unmapped`` (if mapped) and ``removed`` for
        every block, newest first. Raises ListenerError if it is not registered here."""
        with self.system.lock:
            for i, existing in enumerate(self._notifiers):
                if existing is notifier:
                    del self._notifiers[i]
                    break
            else:
                raise ListenerError(f"{notifier!r} is not registered with {self!r}")
            if not self._notifiers:
                self.system.remove_mapping_observer(self._mapping_changed)
            for mr in reversed(self._regions()):
                block = LiveBlock(mr)
                if mr.is_mapped:
                    _call_quietly(notifier, "ram_block_unmapped", block)
                _call_quietly(notifier, "ram_block_removed", block)

    # -- event sources ----------------------------------------------------------------

    def _regions(self) -> list[MemoryRegion]:
        alive = (ref() for ref in list(self._refs.values()))
        return [mr for mr in alive if mr is not None]

    def _collected(self, key: int, ref: weakref.ref[MemoryRegion]) -> None:
        # Runs inside the garbage collector: no lock, no events.
        if self._refs.get(key) is ref:
            del self._refs[key]

    def _dispatch(self, event: str, block: LiveBlock, *args: int, reverse: bool = False) -> None:
        notifiers = reversed(self._notifiers) if reverse else list(self._notifiers)
        for notifier in notifiers:
            _call_quietly(notifier, event, block, *args)

    # The memory system hands regions over as RegionHandles; every one of them is a
    # MemoryRegion, and the isinstance checks are what let them in.

    def _mapping_changed(self, appeared: list[RegionHandle], vanished: list[RegionHandle]) -> None:
        for mr in vanished:
            if isinstance(mr, MemoryRegion) and mr in self:
                self._dispatch("ram_block_unmapped", LiveBlock(mr), reverse=True)
        for mr in appeared:
            if isinstance(mr, MemoryRegion) and mr in self:
                self._dispatch("ram_block_mapped", LiveBlock(mr))

    # RamRegionObserver (called by the memory system with its lock held)

    def ram_region_created(self, mr: RegionHandle) -> None:
        if self._joins_new and isinstance(mr, MemoryRegion):
            self.add(mr)

    def ram_manager_changed(self, mr: RegionHandle) -> None:
        if isinstance(mr, MemoryRegion) and mr in self:
            self._dispatch("ram_block_manager_changed", LiveBlock(mr))

    def _resized(self, mr: MemoryRegion, old_size: int, new_size: int) -> None:
        with self.system.lock:
            if mr in self:
                self._dispatch("ram_block_resized", LiveBlock(mr), old_size, new_size)


class _ResizeHook:
    """The hook a registry puts in a RAM block's ``resize_hooks``; holds nothing alive."""

    __slots__ = ("_mr", "_registry")

    def __init__(self, registry: RamBlockRegistry, mr: MemoryRegion) -> None:
        self._registry = weakref.ref(registry)
        self._mr = weakref.ref(mr)

    def owns(self, registry: RamBlockRegistry, mr: MemoryRegion) -> bool:
        return self._registry() is registry and self._mr() is mr

    def __call__(self, ram: object, old_size: int, new_size: int) -> None:
        registry, mr = self._registry(), self._mr()
        if registry is not None and mr is not None:
            registry._resized(mr, old_size, new_size)


def _call_quietly(notifier: RamBlockNotifier, event: str, block: LiveBlock, *args: int) -> None:
    try:
        getattr(notifier, event)(block, *args)
    except Exception:
        log.exception("RAM block notifier %r raised from %s(%r)", notifier, event, block)


def registry_of(system: MemorySystem) -> RamBlockRegistry:
    """The system registry of ``system``: made on first use, holding every RAM region
    created in the system so far and, from then on, every new one."""

    def make() -> RamBlockRegistry:
        registry = RamBlockRegistry(system.name, system=system)
        for mr in system.ram_regions():
            if isinstance(mr, MemoryRegion):
                registry.add(mr)
        registry._joins_new = True
        return registry

    return system.component(RamBlockRegistry, make)


def default_registry() -> RamBlockRegistry:
    """The default system's registry, which ``MemoryRegion.new_ram`` fills."""
    return registry_of(default_system())
