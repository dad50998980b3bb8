"""Errors of the vfio-style DMA container (the kernel's errno in brackets).

Argument errors are also :class:`~ramdiscard.errors.InvalidArgument` (a ValueError);
every one of them is raised before anything changed.
"""

from __future__ import annotations

from ramdiscard.errors import InvalidArgument, InvalidState, RamDiscardError, ResourceExhausted


class VfioError(RamDiscardError):
    """Base class of the container's errors."""


class MappingConflict(VfioError, InvalidArgument):
    """A map overlaps an existing mapping [EEXIST]; nothing was mapped."""


class UnmapSplitError(VfioError, InvalidArgument):
    """An unmap would cut a mapping in two (type1 v2 refuses) [EINVAL]; nothing removed."""


class MappingLimitError(VfioError, ResourceExhausted):
    """The container holds ``max_mappings`` mappings already [ENOSPC]; nothing was mapped."""


class DmaLimitError(VfioError, ResourceExhausted):
    """Registering a section would let the RDM sections need more DMA mappings than the
    container allows (QEMU 10.2's sanity check); nothing stayed registered or pinned."""


class IommuMapRefused(VfioError, InvalidState):
    """A vIOMMU mapping targets memory that is not fully populated; nothing was pinned."""


class ContainerStateError(VfioError, InvalidState):
    """The container is attached already, not attached, or closed."""
