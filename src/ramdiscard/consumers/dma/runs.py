"""Run pins: the pins of consecutive pieces made by one call and released in spans.

Rules:

* :meth:`~ramdiscard.consumers.dma.DmaBackend.pin_run` pins each ``(host_address,
  size)`` of ``ranges`` (piece ``i`` is ``ranges[i]``), all-or-nothing with the same
  validation, faults and errors as ``pin_many``, and returns one :class:`PinRun`.
  Every piece is a pin of its own: it counts in ``pin_count`` and ``pinned_bytes`` and is
  released on its own.
* ``unpin_run(run, lo, hi)`` releases the pieces of ``[lo, hi)`` that are still pinned,
  in order. If a release fails, the pieces before it are released, it and the ones after
  stay pinned (``run_holds`` tells which) and the error propagates; a retry releases the
  rest. ``InvalidArgument`` (nothing changed) for a run of another backend or a span
  outside the run.
* ``run_handle(run, i)`` is a :class:`PinHandle` for piece ``i`` (for ``dma_read``, or to
  unpin that piece alone); from then on the piece is that handle's pin, released by
  ``unpin_run`` or by unpinning the handle, whichever comes first.
* A backend that keeps nothing per piece until asked (io_uring: one record per run of
  buffer slots, released with one ``BUFFERS_UPDATE`` per run of slots) overrides the
  hooks; the generic form here holds one handle per piece from the start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ramdiscard.errors import InvalidArgument

if TYPE_CHECKING:
    from ramdiscard.interfaces import DmaPinner, PinHandle

RELEASED = 0
"""Piece state: released."""
OWN = 1
"""Piece state: pinned, held by the run itself (backend-private form)."""
HANDLE = 2
"""Piece state: pinned by ``handles[i]`` (check the backend whether it still holds it)."""


class PinRun:
    """The pins of one ``pin_run``: ``ranges[i]`` (host address, size) and ``state[i]``
    of piece ``i`` (:data:`OWN`, :data:`HANDLE` or :data:`RELEASED`), the per-piece
    handles once made, and ``private``, the backend's record of its own pieces."""

    __slots__ = ("handles", "owner", "private", "ranges", "state")

    def __init__(self, owner: object, ranges: Sequence[tuple[int, int]], state: int) -> None:
        self.owner = owner
        self.ranges = list(ranges)
        self.state = bytearray([state]) * len(ranges)
        self.handles: list[PinHandle | None] | None = None
        self.private: Any = None

    def __len__(self) -> int:
        return len(self.state)

    def __repr__(self) -> str:
        live = len(self.state) - self.state.count(RELEASED)
        return f"<PinRun {len(self.state)} pieces, {live} not released>"


def check_span(run: PinRun, owner: object, lo: int, hi: int) -> None:
    """InvalidArgument unless ``run`` belongs to ``owner`` and ``0 <= lo <= hi <= len(run)``."""
    if type(run) is not PinRun or run.owner is not owner:
        raise InvalidArgument(f"{run!r} is not a run pin of this backend")
    if not (type(lo) is int and type(hi) is int and 0 <= lo <= hi <= len(run.state)):
        raise InvalidArgument(f"pieces [{lo!r}, {hi!r}) outside a run of {len(run.state)} pieces")


def generic_pin_run(pinner: DmaPinner, ranges: Sequence[tuple[int, int]]) -> PinRun:
    """``pin_run`` over any DmaPinner: one ``pin_many``, one handle per piece."""
    handles = pinner.pin_many(ranges)
    run = PinRun(pinner, ranges, HANDLE)
    run.handles = list(handles)
    return run


def generic_unpin_run(pinner: DmaPinner, run: PinRun, lo: int, hi: int) -> None:
    """``unpin_run`` over handles: one ``unpin_many`` of the pieces' handles still held."""
    check_span(run, pinner, lo, hi)
    handles = run.handles
    assert handles is not None
    live = [h for h in handles[lo:hi] if h is not None and pinner.holds(h)]
    if live:
        pinner.unpin_many(live)
    for i in range(lo, hi):
        h = handles[i]
        if h is None or not pinner.holds(h):
            run.state[i] = RELEASED


def generic_run_holds(pinner: DmaPinner, run: PinRun, i: int) -> bool:
    """Whether piece ``i`` is still pinned (a run made by :func:`generic_pin_run`)."""
    handles = run.handles
    h = handles[i] if handles is not None else None
    return h is not None and pinner.holds(h)


def generic_run_handle(pinner: DmaPinner, run: PinRun, i: int) -> PinHandle:
    """The handle of piece ``i``; InvalidArgument once the piece is released."""
    check_span(run, pinner, i, i + 1)
    h = run.handles[i] if run.handles is not None else None
    if h is None or not pinner.holds(h):
        raise InvalidArgument(f"piece {i} of {run!r} is released")
    return h
