"""A split virtqueue over guest memory: the device side of the virtio 1.x split ring.

Rules:

* The ring (descriptor table, available ring, used ring, ``num`` entries) is read from and
  written to guest memory through a :class:`GuestMemory` (the memory table). Construction
  checks ``num`` (a power of two, 1..32768), the alignment of the three areas and that
  each lies inside guest memory; otherwise :class:`RingSetupError` and nothing changes.
* :meth:`SplitRing.pop` validates every descriptor of the next chain before returning it.
  Each of these raises :class:`~ramdiscard.interfaces.VirtqueueError` (the driver broke
  the protocol); the ring is then *broken*: nothing was popped, and every later ``pop``
  raises the same way until the ring is rebuilt:

  - the available index ran more than ``num`` entries ahead of the device;
  - a head or ``next`` index not below ``num``;
  - a chain longer than ``num`` descriptors (this is how a loop shows);
  - INDIRECT descriptors (the feature is not offered) or unknown flag bits;
  - a descriptor whose range is not inside one memory-table region;
  - a device-readable descriptor after a device-writable one;
  - more than :data:`MAX_REQUEST_BYTES` device-readable bytes or a writable capacity
    over 4 GiB.

  Descriptor contents are copied once, so a driver changing them concurrently cannot
  make the device act on data it did not validate.
* :meth:`SplitRing.push` writes the response across the chain's writable descriptors,
  then the used entry, then the used index (in that order, so the driver never sees an
  entry before its data). A response longer than the capacity, or an element not popped
  from this ring, raises InvalidArgument and writes nothing. :meth:`SplitRing.detach`
  forgets an element without a used entry.
* :meth:`SplitRing.notify` calls ``signal`` unless the driver set
  VRING_AVAIL_F_NO_INTERRUPT (EVENT_IDX is not offered).
* :attr:`SplitRing.last_avail_idx` is the device's position (GET_VRING_BASE reports it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ramdiscard.errors import InvalidArgument, ProtocolViolation, RamDiscardError
from ramdiscard.interfaces import VirtqElement, VirtqueueError

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
MAX_REQUEST_BYTES = 64 * 1024
"""Device-readable bytes copied per element; a longer chain is a violation."""
MAX_CAPACITY = 1 << 32


class GuestMemory(Protocol):
    """Guest-physical access; ranges outside guest memory raise an exception deriving
    from RamDiscardError (e.g. :class:`~ramdiscard.vhost_user.memtable.AddressError`)."""

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def find(self, gpa: int, length: int) -> object: ...


class RingSetupError(ProtocolViolation):
    """The ring's size or addresses are unusable; no ring was built."""


@dataclass(frozen=True, slots=True)
class _Chain:
    element: VirtqElement
    writable: tuple[tuple[int, int], ...]


class SplitRing:
    """Device side of one split virtqueue; see the module rules."""

    def __init__(
        self,
        memory: GuestMemory,
        *,
        num: int,
        desc: int,
        avail: int,
        used: int,
        last_avail_idx: int = 0,
        signal: Callable[[], None] = lambda: None,
    ) -> None:
        if not 1 <= num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise RingSetupError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        if desc % 16 or avail % 2 or used % 4:
            raise RingSetupError(
                f"misaligned ring: desc {desc:#x} (16), avail {avail:#x} (2), used {used:#x} (4)"
            )
        for name, addr, length in (
            ("descriptor table", desc, 16 * num),
            ("available ring", avail, 6 + 2 * num),
            ("used ring", used, 6 + 8 * num),
        ):
            try:
                memory.find(addr, length)
            except RamDiscardError as exc:
                raise RingSetupError(f"{name} at {addr:#x}+{length:#x}: {exc}") from None
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise RingSetupError(f"ring base {last_avail_idx} is not a 16-bit index")
        self._mem = memory
        self.num = num
        self.desc = desc
        self.avail = avail
        self.used = used
        self.last_avail_idx = last_avail_idx
        try:
            self._used_idx = struct.unpack("<H", memory.read(used + 2, 2))[0]
        except RamDiscardError as exc:
            raise RingSetupError(f"used ring: {exc}") from None
        self._signal = signal
        self._in_flight: dict[int, _Chain] = {}
        self._broken: VirtqueueError | None = None
        self.notifications = 0

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def _violation(self, reason: str) -> VirtqueueError:
        self._broken = VirtqueueError(f"virtqueue: {reason}")
        return self._broken

    def pop(self) -> VirtqElement | None:
        if self._broken is not None:
            raise self._broken
        try:
            avail_idx = struct.unpack("<H", self._mem.read(self.avail + 2, 2))[0]
            pending = (avail_idx - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                return None
            if pending > self.num:
                raise self._violation(
                    f"available index {avail_idx} is {pending} entries ahead of {self.last_avail_idx} "
                    f"(queue size {self.num})"
                )
            slot = self.last_avail_idx % self.num
            head = struct.unpack("<H", self._mem.read(self.avail + 4 + 2 * slot, 2))[0]
            chain = self._walk(head)
        except RamDiscardError as exc:
            if isinstance(exc, VirtqueueError):
                raise
            raise self._violation(str(exc)) from None
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        self._in_flight[head] = chain
        return chain.element

    def _walk(self, head: int) -> _Chain:
        if head >= self.num:
            raise self._violation(f"descriptor head {head} is not below the queue size {self.num}")
        if head in self._in_flight:
            raise self._violation(f"descriptor head {head} is made available while in flight")
        request = bytearray()
        writable: list[tuple[int, int]] = []
        capacity = 0
        index = head
        for _count in range(self.num):
            addr, length, flags, nxt = DESC.unpack(self._mem.read(self.desc + 16 * index, 16))
            if flags & VRING_DESC_F_INDIRECT:
                raise self._violation(f"descriptor {index}: indirect descriptors were not negotiated")
            if flags & ~(VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT):
                raise self._violation(f"descriptor {index}: unknown flags {flags:#x}")
            try:
                self._mem.find(addr, length)
            except RamDiscardError as exc:
                raise self._violation(f"descriptor {index}: {exc}") from None
            if flags & VRING_DESC_F_WRITE:
                capacity += length
                if capacity > MAX_CAPACITY:
                    raise self._violation(f"chain {head}: writable capacity over {MAX_CAPACITY} bytes")
                if length:
                    writable.append((addr, length))
            else:
                if writable:
                    raise self._violation(f"descriptor {index}: device-readable after device-writable")
                if len(request) + length > MAX_REQUEST_BYTES:
                    raise self._violation(
                        f"chain {head}: more than {MAX_REQUEST_BYTES} device-readable bytes"
                    )
                request += self._mem.read(addr, length)
            if not flags & VRING_DESC_F_NEXT:
                return _Chain(VirtqElement(head, bytes(request), capacity), tuple(writable))
            if nxt >= self.num:
                raise self._violation(
                    f"descriptor {index}: next {nxt} is not below the queue size {self.num}"
                )
            index = nxt
        raise self._violation(f"chain {head} is longer than the queue size {self.num} (a loop)")

    def _take(self, element: VirtqElement) -> _Chain:
        chain = self._in_flight.get(element.head)
        if chain is None or chain.element is not element:
            raise InvalidArgument(f"element {element.head} is not in flight on this ring")
        return chain

    def push(self, element: VirtqElement, response: bytes) -> None:
        chain = self._take(element)
        if len(response) > element.response_capacity:
            raise InvalidArgument(
                f"response of {len(response)} bytes does not fit the {element.response_capacity}-byte "
                f"buffer of element {element.head}"
            )
        done = 0
        for addr, length in chain.writable:
            if done >= len(response):
                break
            part = response[done : done + length]
            self._mem.write(addr, part)
            done += len(part)
        slot = self._used_idx % self.num
        self._mem.write(self.used + 4 + 8 * slot, USED_ELEM.pack(element.head, len(response)))
        self._used_idx = (self._used_idx + 1) & 0xFFFF
        self._mem.write(self.used + 2, struct.pack("<H", self._used_idx))
        del self._in_flight[element.head]

    def detach(self, element: VirtqElement) -> None:
        self._take(element)
        del self._in_flight[element.head]

    def notify(self) -> None:
        flags = struct.unpack("<H", self._mem.read(self.avail, 2))[0]
        if flags & VRING_AVAIL_F_NO_INTERRUPT:
            return
        self.notifications += 1
        self._signal()
