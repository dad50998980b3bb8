"""A reference model of virtio-mem request semantics, used as the fuzzers' oracle.

Rules: the model predicts the *documented* answer of every request (virtio-mem.md D-*
ids, the order in :mod:`ramdiscard.providers.virtio_mem.device`): invalid range -> ERROR; PLUG
beyond ``requested_size`` -> NACK; wrong current state -> ERROR; busy, a host failure or a
listener refusal -> BUSY; else ACK. It is plain Python over a set of plugged blocks, shares
no code with the device, and knows nothing about listeners beyond a "would this range be
refused" predicate and "the next host operation fails" flags supplied by the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ramdiscard.providers.virtio_mem.wire import BlockState, Request, RequestType, Response, ResponseType

U64_END = 1 << 64


@dataclass
class DeviceModel:
    addr: int
    region_size: int
    block_size: int
    usable_extent: int
    requested: int = 0
    usable: int = 0
    plugged: set[int] = field(default_factory=set)
    broken: bool = False

    def __post_init__(self) -> None:
        self.resize_usable(self.requested, can_shrink=True)

    @property
    def nb_blocks(self) -> int:
        return self.region_size // self.block_size

    @property
    def plugged_size(self) -> int:
        return len(self.plugged) * self.block_size

    def resize_usable(self, requested: int, *, can_shrink: bool) -> None:
        bs = self.block_size
        new = 0 if requested == 0 else min(self.region_size, -(-(requested + self.usable_extent) // bs) * bs)
        if new >= self.usable or can_shrink:
            self.usable = new

    def set_requested(self, value: int) -> None:
        if value != self.requested:
            self.resize_usable(value, can_shrink=False)
            self.requested = value

    def _valid(self, gpa: int, size: int) -> bool:
        end = self.addr + self.usable
        return (
            gpa % self.block_size == 0
            and size > 0
            and gpa + size <= U64_END
            and self.addr <= gpa < end
            and gpa + size <= end
        )

    def expect(
        self,
        req: Request,
        *,
        refused: Callable[[int, int], bool] = lambda o, s: False,
        busy: bool = False,
        populate_fails: bool = False,
        discard_fails: bool = False,
    ) -> Response:
        """The documented response; also applies it to the model."""
        bs = self.block_size
        if req.type is RequestType.UNPLUG_ALL:
            if self.plugged:
                if busy or discard_fails:
                    return Response(ResponseType.BUSY)
                self.plugged.clear()
            self.resize_usable(self.requested, can_shrink=True)
            return Response(ResponseType.ACK)
        size = req.nb_blocks * bs
        if not self._valid(req.addr, size):
            return Response(ResponseType.ERROR)
        first = (req.addr - self.addr) // bs
        blocks = set(range(first, first + req.nb_blocks))
        if req.type is RequestType.STATE:
            n = len(blocks & self.plugged)
            state = (
                BlockState.PLUGGED
                if n == len(blocks)
                else BlockState.UNPLUGGED
                if n == 0
                else BlockState.MIXED
            )
            return Response(ResponseType.ACK, state)
        if req.type is RequestType.PLUG:
            if self.plugged_size + size > self.requested:
                return Response(ResponseType.NACK)
            if blocks & self.plugged:
                return Response(ResponseType.ERROR)
            if busy or populate_fails or refused(first * bs, size):
                return Response(ResponseType.BUSY)
            self.plugged |= blocks
            return Response(ResponseType.ACK)
        if not blocks <= self.plugged:
            return Response(ResponseType.ERROR)
        if busy or discard_fails:
            return Response(ResponseType.BUSY)
        self.plugged -= blocks
        return Response(ResponseType.ACK)

    def system_reset(self, *, busy: bool = False, discard_fails: bool = False) -> None:
        self.expect(Request(RequestType.UNPLUG_ALL), busy=busy, discard_fails=discard_fails)
        self.broken = False
