"""MemoryRegion: QEMU's memory-region tree (RAM, container, alias).

Rules:

* A region is one of three kinds. RAM regions are backed by a host RAM block and are the
  only ones that hold guest memory and the only ones that may have a RamDiscardManager.
  Containers hold subregions and nothing else. Aliases show ``size`` bytes of another
  region starting at ``alias_offset``.
* Subregions sit at an offset inside their parent with a priority. Where subregions
  overlap, the higher priority wins; among equal priorities the one added last wins. A
  region has at most one parent.
* Every change to the tree is a topology change (see :mod:`ramdiscard.memory.topology`):
  address spaces re-render and notify their listeners, at once or at the end of the
  enclosing transaction.
* A RAM region's manager can be set once, and set, replaced or cleared only while the
  region is not mapped into any address space, directly or through an alias. QEMU only
  documents this; here it is enforced, because memory listeners look the manager up at
  ``region_add`` and rely on finding the same one at ``region_del``.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

from ramdiscard.errors import InvalidArgument, ManagerBusy, RegionMapped
from ramdiscard.interfaces import HostMemory as RamBackend
from ramdiscard.memory import topology
from ramdiscard.ramblocks import registry as ramblock_registry

if TYPE_CHECKING:
    from ramdiscard.memory.address_space import AddressSpace
    from ramdiscard.rdm.manager import RamDiscardManager


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
        self._rdm: RamDiscardManager | None = None

    # -- constructors ---------------------------------------------------------------

    @classmethod
    def new_ram(cls, name: str, ram: RamBackend | int, *, readonly: bool = False) -> MemoryRegion:
        """A RAM region over ``ram`` (a RAM block), or over a new anonymous RAM block of
        ``ram`` bytes when an int is given. The region joins the default RAM block
        registry (:func:`ramdiscard.ramblocks.default_registry`)."""
        if isinstance(ram, bool):
            raise InvalidArgument(f"region {name!r}: RAM must be a RAM block or a size")
        if isinstance(ram, int):
            from ramdiscard.hostmem import RamBlock

            if ram <= 0:
                raise InvalidArgument(f"region {name!r}: RAM size must be positive, got {ram}")
            ram = RamBlock(ram, name=name)
        if not isinstance(ram, RamBackend):
            raise InvalidArgument(f"region {name!r}: {ram!r} is not a RAM block")
        mr = cls(name, ram.size, RegionKind.RAM, ram=ram, readonly=readonly)
        ramblock_registry.region_created(mr)
        return mr

    @classmethod
    def new_container(cls, name: str, size: int) -> MemoryRegion:
        """A region that only holds subregions."""
        return cls(name, size, RegionKind.CONTAINER)

    @classmethod
    def new_alias(
        cls, name: str, target: MemoryRegion, offset: int, size: int, *, unmergeable: bool = False
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
        )

    # -- attributes ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

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
        with topology.lock:
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
            mr._container = self
            mr._offset = offset
            mr._priority = priority
            index = len(self._subregions)
            for i, other in enumerate(self._subregions):
                if priority >= other._priority:
                    index = i
                    break
            self._subregions.insert(index, mr)
            topology.changed()

    def del_subregion(self, mr: MemoryRegion) -> None:
        """Remove the subregion ``mr``; InvalidArgument if it is not a child of this region."""
        with topology.lock:
            if mr._container is not self:
                raise InvalidArgument(f"{mr.name!r} is not a subregion of {self.name!r}")
            self._subregions.remove(mr)
            mr._container = None
            topology.changed()

    def set_enabled(self, enabled: bool) -> None:
        """A disabled region (and everything below it) is absent from every flat view."""
        with topology.lock:
            if self._enabled != enabled:
                self._enabled = enabled
                topology.changed()

    def set_readonly(self, readonly: bool) -> None:
        with topology.lock:
            if self._readonly != readonly:
                self._readonly = readonly
                topology.changed()

    # -- mapping and the discard manager ----------------------------------------------

    def mapped_in(self) -> list[AddressSpace]:
        """Address spaces whose current flat view contains a section of this region."""
        with topology.lock:
            return [s for s in topology.live_spaces() if s.maps(self)]

    @property
    def is_mapped(self) -> bool:
        return bool(self.mapped_in())

    @property
    def ram_discard_manager(self) -> RamDiscardManager | None:
        """The region's RamDiscardManager; always None for non-RAM regions."""
        return self._rdm if self.kind is RegionKind.RAM else None

    def has_ram_discard_manager(self) -> bool:
        return self.ram_discard_manager is not None

    def set_ram_discard_manager(self, rdm: RamDiscardManager | None) -> None:
        """Set (or clear, with None) the region's manager.

        Raises InvalidArgument for a non-RAM region or a manager of another region,
        ManagerBusy when a manager is already set (clear it first), and RegionMapped when
        the region is mapped into an address space, directly or through an alias.
        Nothing changes when it raises. After the change, RAM block notifiers get
        ``ram_block_manager_changed``.
        """
        with topology.lock:
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
            ramblock_registry.manager_changed(self)
