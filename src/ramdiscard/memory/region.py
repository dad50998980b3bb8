"""MemoryRegion: QEMU's memory-region tree (RAM, container, alias).

Rules:

* A region is one of three kinds. RAM regions are backed by a host RAM block and are the
  only ones that hold guest memory and the only ones that may have a RamDiscardManager.
  Containers hold subregions and nothing else. Aliases show ``size`` bytes of another
  region starting at ``alias_offset``.
* Subregions sit at an offset inside their parent with a priority. Where subregions
  overlap, the higher priority wins; among equal priorities the one added last wins. A
  region has at most one parent.
* A region belongs to one :class:`~ramdiscard.memory.system.MemorySystem`. A RAM region
  joins its system when created (``system=None``: the default system) and the system's
  RAM-region observers hear of it. A container or alias created without ``system=`` takes
  the system of the first region it meets: a subregion added to it, the container it is
  added to, or (alias) its target; until then :attr:`MemoryRegion.system` is the default
  system. Putting a region of one system into a region of another raises InvalidArgument.
* Every change to the tree is a topology change of the region's system: that system's
  address spaces (and no other) re-render and notify their listeners, at once or at the
  end of the enclosing transaction.
* A RAM region's manager can be set once, and set, replaced or cleared only while the
  region is not mapped into any address space, directly or through an alias. QEMU only
  documents this; here it is enforced, because memory listeners look the manager up at
  ``region_add`` and rely on finding the same one at ``region_del``.
* A :class:`MemoryRegionSection` is one contiguous piece of one region as an address space
  sees it. It lives here, with the region it names, because the two refer to each other
  (a region's discard manager answers per section). A section is a value: frozen,
  compared field by field (the region by identity). Offsets are plain ints, so the
  128-bit arithmetic QEMU needs does not arise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from ramdiscard.errors import InvalidArgument, ManagerBusy, RegionMapped
from ramdiscard.interfaces import HostMemory as RamBackend
from ramdiscard.memory.system import LiveSpace, MemorySystem, default_system


class RegionDiscardManager(Protocol):
    """What the memory model (and a reader of guest memory) needs from a RAM region's
    RamDiscardManager: the query half of the contract. The full contract, listeners
    included, is :class:`ramdiscard.rdm.RamDiscardManager`."""

    @property
    def region(self) -> MemoryRegion: ...

    def get_min_granularity(self, mr: MemoryRegion) -> int: ...

    def is_populated(self, section: MemoryRegionSection) -> bool: ...

    def replay_populated(
        self, section: MemoryRegionSection, fn: Callable[[MemoryRegionSection], object]
    ) -> None: ...

    def replay_discarded(
        self, section: MemoryRegionSection, fn: Callable[[MemoryRegionSection], object]
    ) -> None: ...


RamFactory = Callable[[int, str], RamBackend]
"""Makes an anonymous RAM block of ``size`` bytes named ``name`` (for ``new_ram(name, size)``)."""

_ram_factory: RamFactory | None = None


def install_ram_factory(factory: RamFactory) -> None:
    """Install what ``MemoryRegion.new_ram(name, size)`` uses to make host RAM. The host
    memory layer is above this model, so it is installed from above (the package root
    installs :class:`ramdiscard.hostmem.RamBlock`)."""
    global _ram_factory
    _ram_factory = factory


class RegionKind(StrEnum):
    RAM = "ram"
    CONTAINER = "container"
    ALIAS = "alias"


class MemoryRegion:
    """A node of the memory-region tree. Create with :meth:`new_ram`, :meth:`new_container`
    or :meth:`new_alias`."""

    def __init__(
        self,
        name: str,
        size: int,
        kind: RegionKind,
        *,
        ram: RamBackend | None = None,
        alias_target: MemoryRegion | None = None,
        alias_offset: int = 0,
        readonly: bool = False,
        unmergeable: bool = False,
        system: MemorySystem | None = None,
    ) -> None:
        if size < 0:
            raise InvalidArgument(f"region {name!r}: negative size {size}")
        self.name = name
        self._size = size
        self.kind = kind
        self.ram = ram
        self.alias_target = alias_target
        self.alias_offset = alias_offset
        self._readonly = readonly
        self._unmergeable = unmergeable
        self._enabled = True
        self._container: MemoryRegion | None = None
        self._offset = 0
        self._priority = 0
        # Highest priority first; among equals the most recently added first.
        self._subregions: list[MemoryRegion] = []
        self._rdm: RegionDiscardManager | None = None
        self._system = system

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def new_ram(
        cls, name: str, ram: RamBackend | int, *, readonly: bool = False, system: MemorySystem | None = None
    ) -> MemoryRegion:
        """A RAM region over ``ram`` (a RAM block), or over a new anonymous RAM block of
        ``ram`` bytes when an int is given, in ``system`` (default: the default system).
        The system's RAM-region observers are told (its RAM-block registry joins it)."""
        if isinstance(ram, bool):
            raise InvalidArgument(f"region {name!r}: RAM must be a RAM block or a size")
        if isinstance(ram, int):
            if ram <= 0:
                raise InvalidArgument(f"region {name!r}: RAM size must be positive, got {ram}")
            if _ram_factory is None:
                raise InvalidArgument(f"region {name!r}: no host RAM factory installed; pass a RAM block")
            ram = _ram_factory(ram, name)
        if not isinstance(ram, RamBackend):
            raise InvalidArgument(f"region {name!r}: {ram!r} is not a RAM block")
        system = system if system is not None else default_system()
        mr = cls(name, ram.size, RegionKind.RAM, ram=ram, readonly=readonly, system=system)
        system.ram_region_created(mr)
        return mr

    @classmethod
    def new_container(cls, name: str, size: int, *, system: MemorySystem | None = None) -> MemoryRegion:
        """A region that only holds subregions (``system``: see the module rules)."""
        return cls(name, size, RegionKind.CONTAINER, system=system)

    @classmethod
    def new_alias(
        cls,
        name: str,
        target: MemoryRegion,
        offset: int,
        size: int,
        *,
        unmergeable: bool = False,
        system: MemorySystem | None = None,
    ) -> MemoryRegion:
        """A window of ``size`` bytes onto ``target`` starting at ``offset`` in it.

        ``unmergeable`` keeps the flat view from merging this alias's ranges with
        neighbours of the same target (virtio-mem's memslots need one section each).
        """
        if offset < 0 or size < 0 or offset + size > target.size:
            raise InvalidArgument(
                f"alias {name!r}: [{offset:#x}, {offset + size:#x}) is outside "
                f"{target.name!r} (size {target.size:#x})"
            )
        return cls(
            name,
            size,
            RegionKind.ALIAS,
            alias_target=target,
            alias_offset=offset,
            unmergeable=unmergeable,
            system=system,
        )

    # -- attributes ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def system(self) -> MemorySystem:
        """The memory system this region belongs to (see the module rules)."""
        return self._bound_system() or default_system()

    def _bound_system(self) -> MemorySystem | None:
        node: MemoryRegion | None = self
        while node is not None:
            if node._system is not None:
                return node._system
            if node.alias_target is not None:
                target = node.alias_target._bound_system()
                if target is not None:
                    return target
            node = node._container
        return None

    def _root(self) -> MemoryRegion:
        node = self
        while node._container is not None:
            node = node._container
        return node

    @property
    def is_ram(self) -> bool:
        return self.kind is RegionKind.RAM

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def unmergeable(self) -> bool:
        return self._unmergeable

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def container(self) -> MemoryRegion | None:
        """The parent region, or None."""
        return self._container

    @property
    def offset(self) -> int:
        """Offset inside the parent (meaningless without one)."""
        return self._offset

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def subregions(self) -> tuple[MemoryRegion, ...]:
        """Subregions in rendering order: highest priority first."""
        return tuple(self._subregions)

    def __repr__(self) -> str:
        return f"<MemoryRegion {self.kind} {self.name!r} size={self._size:#x}>"

    # -- tree changes ---------------------------------------------------------------

    def add_subregion(self, offset: int, mr: MemoryRegion, priority: int = 0) -> None:
        """Place ``mr`` at ``offset`` inside this region.

        Raises InvalidArgument if ``mr`` already has a parent, is this region or one of its
        ancestors, if this region is an alias, or if ``offset`` is negative.
        """
        mine, theirs = self._bound_system(), mr._bound_system()
        if mine is not None and theirs is not None and mine is not theirs:
            raise InvalidArgument(
                f"{mr.name!r} belongs to memory system {theirs.name!r}, "
                f"{self.name!r} to {mine.name!r}: regions of two systems cannot be combined"
            )
        system = mine or theirs or default_system()
        with system.lock:
            if self.kind is RegionKind.ALIAS:
                raise InvalidArgument(f"alias {self.name!r} cannot have subregions")
            if offset < 0:
                raise InvalidArgument(f"negative subregion offset {offset:#x}")
            if mr._container is not None:
                raise InvalidArgument(f"{mr.name!r} is already a subregion of {mr._container.name!r}")
            node: MemoryRegion | None = self
            while node is not None:
                if node is mr:
                    raise InvalidArgument(f"adding {mr.name!r} under {self.name!r} makes a cycle")
                node = node._container
            if mine is None and theirs is not None:
                self._root()._system = theirs
            if theirs is None and mine is not None:
                mr._system = mine
            mr._container = self
            mr._offset = offset
            mr._priority = priority
            index = len(self._subregions)
            for i, other in enumerate(self._subregions):
                if priority >= other._priority:
                    index = i
                    break
            self._subregions.insert(index, mr)
            system.changed()

    def del_subregion(self, mr: MemoryRegion) -> None:
        """Remove the subregion ``mr``; InvalidArgument if it is not a child of this region."""
        system = self.system
        with system.lock:
            if mr._container is not self:
                raise InvalidArgument(f"{mr.name!r} is not a subregion of {self.name!r}")
            mr._system = mr._bound_system()
            self._subregions.remove(mr)
            mr._container = None
            system.changed()

    def set_enabled(self, enabled: bool) -> None:
        """A disabled region (and everything below it) is absent from every flat view."""
        system = self.system
        with system.lock:
            if self._enabled != enabled:
                self._enabled = enabled
                system.changed()

    def set_readonly(self, readonly: bool) -> None:
        system = self.system
        with system.lock:
            if self._readonly != readonly:
                self._readonly = readonly
                system.changed()

    # -- mapping and the discard manager ----------------------------------------------

    def mapped_in(self) -> list[LiveSpace]:
        """Address spaces whose current flat view contains a section of this region."""
        system = self.system
        with system.lock:
            return [s for s in system.live_spaces() if s.maps(self)]

    @property
    def is_mapped(self) -> bool:
        return bool(self.mapped_in())

    @property
    def ram_discard_manager(self) -> RegionDiscardManager | None:
        """The region's RamDiscardManager; always None for non-RAM regions."""
        return self._rdm if self.kind is RegionKind.RAM else None

    def has_ram_discard_manager(self) -> bool:
        return self.ram_discard_manager is not None

    def set_ram_discard_manager(self, rdm: RegionDiscardManager | None) -> None:
        """Set (or clear, with None) the region's manager.

        Raises InvalidArgument for a non-RAM region or a manager of another region,
        ManagerBusy when a manager is already set (clear it first), and RegionMapped when
        the region is mapped into an address space, directly or through an alias.
        Nothing changes when it raises. After the change, RAM block notifiers get
        ``ram_block_manager_changed`` (through the system's RAM-region observers).
        """
        system = self.system
        with system.lock:
            if self.kind is not RegionKind.RAM:
                raise InvalidArgument(f"{self.name!r} is not a RAM region; only RAM has a manager")
            if rdm is not None and rdm.region is not self:
                raise InvalidArgument(f"manager {rdm!r} manages {rdm.region.name!r}, not {self.name!r}")
            if rdm is not None and self._rdm is not None:
                raise ManagerBusy(f"{self.name!r} already has RamDiscardManager {self._rdm!r}")
            if rdm is self._rdm:
                return
            spaces = self.mapped_in()
            if spaces:
                names = ", ".join(repr(s.name) for s in spaces)
                action = "cleared" if rdm is None else "set"
                raise RegionMapped(
                    f"RamDiscardManager of {self.name!r} cannot be {action} while it is "
                    f"mapped into address space {names}"
                )
            self._rdm = rdm
            system.ram_manager_changed(self)


_new = object.__new__


@dataclass(frozen=True, slots=True)
class MemoryRegionSection:
    """``size`` bytes of ``mr`` starting at ``offset_within_region``, seen at
    ``offset_within_address_space`` (guest-physical address or IOVA)."""

    mr: MemoryRegion
    offset_within_region: int
    size: int
    offset_within_address_space: int = 0
    readonly: bool = False

    def __post_init__(self) -> None:
        if self.offset_within_region < 0 or self.size < 0 or self.offset_within_address_space < 0:
            raise InvalidArgument(
                f"section of {self.mr.name!r}: negative offset or size "
                f"(offset {self.offset_within_region:#x}, size {self.size:#x})"
            )

    @property
    def end(self) -> int:
        """First region offset after the section."""
        return self.offset_within_region + self.size

    @property
    def address_end(self) -> int:
        """First address-space offset after the section."""
        return self.offset_within_address_space + self.size

    def intersect(self, offset: int, size: int) -> MemoryRegionSection | None:
        """The part of this section inside region range ``[offset, offset + size)``.

        Returns a new section with both offsets shifted consistently and every other field
        kept, or None when the intersection is empty.
        """
        start = max(self.offset_within_region, offset)
        end = min(self.end, offset + size)
        if end <= start:
            return None
        if start == self.offset_within_region and end == self.end:
            return self
        # Built without __init__ through the slot descriptors: the fields are derived from
        # a valid section, and replays create one section per run, so this is a hot path.
        part = _new(MemoryRegionSection)
        _set_mr(part, self.mr)
        _set_offset(part, start)
        _set_size(part, end - start)
        _set_address(part, self.offset_within_address_space + (start - self.offset_within_region))
        _set_readonly(part, self.readonly)
        return part

    def __repr__(self) -> str:
        ro = ", readonly" if self.readonly else ""
        return (
            f"MemoryRegionSection({self.mr.name!r}, "
            f"[{self.offset_within_region:#x}+{self.size:#x}] @ {self.offset_within_address_space:#x}{ro})"
        )


_SetField = Callable[[MemoryRegionSection, Any], None]
_slots = MemoryRegionSection.__dict__
_set_mr: _SetField = _slots["mr"].__set__
_set_offset: _SetField = _slots["offset_within_region"].__set__
_set_size: _SetField = _slots["size"].__set__
_set_address: _SetField = _slots["offset_within_address_space"].__set__
_set_readonly: _SetField = _slots["readonly"].__set__
