"""The project's exception hierarchy.

Every error raised on purpose by ramdiscard derives from :class:`RamDiscardError`, so a
caller can catch the whole family. Argument errors (bad offsets, sizes, alignment) are
also :class:`ValueError` subclasses, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class RamDiscardError(Exception):
    """Base class of all ramdiscard errors."""


class InvalidArgument(RamDiscardError, ValueError):
    """An argument (offset, size, alignment, section) is not acceptable; nothing changed."""


class ManagerBusy(RamDiscardError):
    """A RamDiscardManager is already set on the region (QEMU's -EBUSY)."""


class RegionMapped(RamDiscardError):
    """The region is mapped into an address space, so its manager cannot change."""


class ListenerError(RamDiscardError):
    """A listener was used in a way the protocol forbids (registered twice, not registered,
    or a state change attempted from inside a notification)."""


class DiscardPolicyError(RamDiscardError):
    """A discard require/disable request conflicts with the current counters; nothing changed."""


class HostMemoryError(RamDiscardError, OSError):
    """A host memory operation (mmap, madvise, fallocate, mlock, ...) failed.

    ``errno`` is the kernel's error number; the message names the operation and the range.
    """

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, message)
