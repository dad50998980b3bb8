"""LocalVirtqueue: an in-process virtqueue (sans-I/O), both sides of one queue.

Rules:

* The driver side makes an element available with :meth:`LocalVirtqueue.add` (request
  bytes the device may read, and the capacity of the buffer the device may write), then
  :meth:`~LocalVirtqueue.kick`\\ s: the queue calls its ``handler`` with itself, as a
  device's queue-notify handler runs. It collects answers with
  :meth:`~LocalVirtqueue.get_used`, oldest first.
* The device side is the :class:`~ramdiscard.interfaces.Virtqueue` protocol: ``pop`` in
  the order elements were added, ``push`` (the used length is the response's length, at
  most the element's capacity), ``detach`` (no used entry), ``notify`` (counted).
* At most ``size`` elements are in flight (added and not yet taken back with
  ``get_used`` or detached); one more is refused with :class:`QueueFull`. Heads are the
  ids ``0 .. size - 1``, lowest free first, as a split ring's descriptor heads.
* Every refusal (bad argument, element not in flight, response larger than the buffer)
  raises InvalidArgument and changes nothing. An exception from the handler propagates
  out of :meth:`~LocalVirtqueue.kick`; the queue keeps whatever state the handler left.

Theory of operation: the available ring is a deque of elements, the used ring a deque of
:class:`UsedElement`, free heads a heap; ``_popped`` maps the heads the device holds to
their elements, so an element cannot be pushed twice, or pushed after a detach.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from ramdiscard.errors import InvalidArgument
from ramdiscard.interfaces import VirtqElement, Virtqueue

DEFAULT_QUEUE_SIZE = 64
"""QEMU's default ``vq_size`` for a generic vhost-user device."""

QueueHandler = Callable[[Virtqueue], object]
"""The device's queue-notify handler: called with the queue on every kick."""


class QueueFull(InvalidArgument):
    """Every descriptor head of the queue is in flight; nothing was added."""


class UsedElement(NamedTuple):
    """One used-ring entry: the element's head, and the ``length`` bytes the device wrote."""

    head: int
    data: bytes

    @property
    def length(self) -> int:
        return len(self.data)


_new = tuple.__new__


class LocalVirtqueue:
    """One virtqueue of ``size`` descriptor chains served by ``handler``; see the module rules."""

    def __init__(self, handler: QueueHandler, *, size: int = DEFAULT_QUEUE_SIZE) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise InvalidArgument(f"queue size must be a positive int, got {size!r}")
        self.handler = handler
        self.size = size
        self._free = list(range(size))
        self._avail: deque[VirtqElement] = deque()
        self._popped: dict[int, VirtqElement] = {}
        self._used: deque[UsedElement] = deque()
        self.notifications = 0
        """Used-buffer notifications the device sent."""
        self.detached: list[VirtqElement] = []
        """Elements the device gave back without an answer, oldest first."""

    # -- driver side ----------------------------------------------------------------------

    def add(self, request: bytes, response_capacity: int) -> int:
        """Make an element available; returns its head. Raises InvalidArgument for a
        negative capacity and QueueFull when ``size`` elements are in flight."""
        if type(response_capacity) is not int or response_capacity < 0:
            raise InvalidArgument(f"response capacity must be an int >= 0, got {response_capacity!r}")
        if not self._free:
            raise QueueFull(f"virtqueue full: {self.size} elements in flight")
        head = heapq.heappop(self._free)
        # tuple.__new__ skips the NamedTuple's Python-level __new__: this is per request.
        self._avail.append(_new(VirtqElement, (head, bytes(request), response_capacity)))
        return head

    def kick(self) -> None:
        """Notify the device: runs ``handler(self)``; its exception propagates."""
        self.handler(self)

    def get_used(self) -> UsedElement | None:
        """Take the oldest used entry (its head is free again), or None."""
        if not self._used:
            return None
        used = self._used.popleft()
        heapq.heappush(self._free, used.head)
        return used

    @property
    def available(self) -> int:
        """Elements added and not yet popped by the device."""
        return len(self._avail)

    @property
    def in_flight(self) -> int:
        """Elements added and not yet taken back (used but not collected counts)."""
        return self.size - len(self._free)

    # -- device side (the Virtqueue protocol) ----------------------------------------------

    def pop(self) -> VirtqElement | None:
        if not self._avail:
            return None
        element = self._avail.popleft()
        self._popped[element.head] = element
        return element

    def push(self, element: VirtqElement, response: bytes) -> None:
        head = element[0]
        if self._popped.get(head) is not element:
            self._not_popped(element)
        if len(response) > element[2]:
            raise InvalidArgument(
                f"response of {len(response)} bytes does not fit the {element.response_capacity}-byte "
                f"buffer of element {head}"
            )
        del self._popped[head]
        self._used.append(_new(UsedElement, (head, bytes(response))))

    def detach(self, element: VirtqElement) -> None:
        if self._popped.get(element.head) is not element:
            self._not_popped(element)
        del self._popped[element.head]
        heapq.heappush(self._free, element.head)
        self.detached.append(element)

    def notify(self) -> None:
        self.notifications += 1

    @staticmethod
    def _not_popped(element: VirtqElement) -> None:
        raise InvalidArgument(f"element {element.head} is not in flight on this device side")
