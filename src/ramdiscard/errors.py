"""The project's exception taxonomy.

Every error raised on purpose by ramdiscard derives from :class:`RamDiscardError`. Every
concrete error is also of exactly one of five kinds, so a caller can decide what to do from
the kind alone:

=========================  ==========================================================  =====================
kind                       meaning                                                     also a
=========================  ==========================================================  =====================
:class:`InvalidArgument`   the caller's argument or operator input (offset, size,     ``ValueError``
                           alignment, section, scenario file) is unacceptable
:class:`InvalidState`      the call is valid but not now: the object is in a state    ``RuntimeError``
                           that forbids it (already set, mapped, broken, closed)
:class:`ResourceExhausted` a finite resource ran out (memslots, IOVA space, DMA
                           mappings, pinned-page limits)
:class:`HostError`         the host refused: a syscall or kernel facility failed      ``OSError``
                           (``errno`` set)
:class:`ProtocolViolation` bytes from an untrusted peer (guest request, migration
                           stream, state image, trace, QMP client) break their format
=========================  ==========================================================  =====================

Packages subclass these kinds (for example ``vfio.MappingLimitError`` is a
:class:`ResourceExhausted`, ``virtio_mem.ProtocolError`` a :class:`ProtocolViolation`); a
package may also have a root of its own (``VfioError``, ``MigrationError``,
``VirtioMemError``) so its callers can catch all of its errors at once. Two reports are of
no kind because they describe listeners, not the call: :class:`ListenerFailure`s
(``TopologyError``, ``DiscardNotificationError``) say that a change *was* applied and some
listeners raised while being told; they chain what the listeners raised.
The promise that goes with every one of them: the operation that raised changed nothing,
unless its own docstring names what it leaves behind (a discard that listeners failed to
hear still happened, for example).
"""

from __future__ import annotations


class RamDiscardError(Exception):
    """Base class of all ramdiscard errors."""


class InvalidArgument(RamDiscardError, ValueError):
    """An argument (offset, size, alignment, section) or operator input is not acceptable;
    nothing changed."""


class InvalidState(RamDiscardError, RuntimeError):
    """The request is well formed but the object's current state forbids it; nothing
    changed."""


class ResourceExhausted(RamDiscardError):
    """A finite resource (memslots, IOVA space, DMA mappings, pin limits) ran out; nothing
    changed."""


class HostError(RamDiscardError, OSError):
    """The host refused an operation or lacks a facility; ``errno`` is the kernel's error
    number when one applies (``HostError(errno, message)``), else None
    (``HostError(message)``)."""

    def __init__(self, *args: object) -> None:
        OSError.__init__(self, *args)


class ProtocolViolation(RamDiscardError):
    """Bytes from an untrusted peer (guest, migration stream, state image, trace, QMP client)
    do not follow their format; nothing changed."""


class ManagerBusy(InvalidState):
    """A RamDiscardManager is already set on the region (QEMU's -EBUSY)."""


class RegionMapped(InvalidState):
    """The region is mapped into an address space, so its manager cannot change."""


class ListenerFailure(RamDiscardError):
    """One or more listeners raised while being told of a change that was applied anyway;
    every other listener was still told. What the listeners raised is chained."""


class ListenerError(InvalidState):
    """A listener was used in a way the protocol forbids (registered twice, not registered,
    or a state change attempted from inside a notification)."""


class DiscardPolicyError(InvalidState):
    """A discard require/disable request conflicts with the current counters; nothing changed."""


class HostMemoryError(HostError):
    """A host memory operation (mmap, madvise, fallocate, mlock, ...) failed.

    ``errno`` is the kernel's error number; the message names the operation and the range.
    """

    def __init__(self, errno: int, message: str) -> None:
        OSError.__init__(self, errno, message)
