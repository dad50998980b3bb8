"""PlugState: the plug state of one virtio-mem device, without I/O.

Rules (virtio-mem.md D-* ids):

* Geometry is fixed at creation: ``block_size`` (a power of two), ``region_size`` (a
  multiple of it), one bit per block. Set = plugged. ``plugged_size`` is the bitmap's
  popcount times ``block_size``; it is never stored anywhere else (D-CFG-3).
* ``requested_size`` is a multiple of ``block_size`` in ``[0, region_size]``. The usable
  region for a requested size ``r`` is 0 when ``r`` is 0, else
  ``min(region_size, align_up(r + usable_extent, block_size))``.
* The usable region grows when ``requested_size`` is written and never shrinks then
  (D-CFG-8); it shrinks to the value for the current ``requested_size`` only when an
  UNPLUG_ALL (or a system reset, which is one) is applied, when nothing stays plugged.
  Invariants: ``usable_region_size >= requested_size`` (D-CFG-4) and no plugged block lies
  at or beyond ``usable_region_size``.
* A request becomes a :class:`Decision`, checked in QEMU's order. PLUG/UNPLUG/STATE:
  misaligned address, zero blocks, 64-bit overflow or a block outside the usable region
  -> ERROR (D-PLUG-3..5, D-UNPLUG-3..5, D-ST-3..5). PLUG beyond ``requested_size`` ->
  NACK. PLUG of a plugged block / UNPLUG of an unplugged block -> ERROR (D-PLUG-6,
  D-UNPLUG-6). Then, for PLUG/UNPLUG and for an UNPLUG_ALL with something plugged, a busy
  device -> BUSY. Otherwise the decision is ACK with an :class:`Action` naming the range
  whose memory must be populated (PLUG) or discarded (UNPLUG, UNPLUG_ALL). A STATE
  decision is final: ACK with PLUGGED / UNPLUGGED / MIXED (D-ST-6..9).
* Deciding changes nothing. The driver of this core performs the decision's effects and
  then calls :meth:`PlugState.apply`; if an effect fails it answers BUSY and does not
  apply, and the state is as before.
* A restore (:meth:`PlugState.plan_restore` then :meth:`PlugState.commit_restore`) is
  accepted only into a state with nothing plugged, with a bitmap of exactly
  ``nb_blocks`` bits whose popcount matches the claimed plugged size and whose plugged
  blocks lie inside the claimed usable region; otherwise StateError, nothing changed.

Theory of operation: PlugState is a value-level model of the device's side of the
protocol. It holds no host memory, no listeners, no lock and no callbacks; every method is
a pure function of its arguments and the current state. Keeping "what is the answer and
which range does it touch" apart from "populate/discard host memory, map memslots, tell
listeners" lets the device order its effects explicitly and lets this module be tested
against the spec exhaustively. Block-range queries touch only the bitmap words of the
range, so request cost does not grow with the region.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import NamedTuple

from ramdiscard.errors import InvalidArgument
from ramdiscard.providers.virtio_mem.persist import StateError, StateImage
from ramdiscard.providers.virtio_mem.wire import (
    U64_MAX,
    BlockState,
    ConfigSpace,
    Request,
    RequestType,
    ResponseType,
)
from ramdiscard.rdm.bitmap import Bitmap
from ramdiscard.units import align_up, is_power_of_2

Run = tuple[int, int]
"""A byte range of the region: (region offset, size)."""


class Action(Enum):
    """What an ACK decision asks of the device before :meth:`PlugState.apply`."""

    NONE = 0
    """Nothing to do (STATE, and every refusal)."""
    PLUG = 1
    """Populate ``[offset, offset + size)`` (prealloc, memslots, listeners), then apply."""
    UNPLUG = 2
    """Discard ``[offset, offset + size)`` (host memory, listeners, memslots), then apply."""
    UNPLUG_ALL = 3
    """Discard every plugged block (``size`` bytes of them, 0 if none), then apply."""


class Decision(NamedTuple):
    """The answer to one request and the effect it needs.

    ``response`` is final when ``action`` is NONE; otherwise it is ACK, valid only if the
    device performs the effect and then applies the decision. (A named tuple: built on
    every request, and cheaper to build than a frozen dataclass.)
    """

    response: ResponseType
    action: Action = Action.NONE
    offset: int = 0
    size: int = 0
    state: BlockState | None = None


# Enum member lookups cost a class-attribute walk each; the request path uses these names.
_ACK, _BUSY = ResponseType.ACK, ResponseType.BUSY
_PLUG, _UNPLUG, _UNPLUG_ALL = Action.PLUG, Action.UNPLUG, Action.UNPLUG_ALL
_RT_PLUG, _RT_UNPLUG, _RT_UNPLUG_ALL = RequestType.PLUG, RequestType.UNPLUG, RequestType.UNPLUG_ALL

_ADDR_END = U64_MAX + 1
_tuple_new = tuple.__new__

ERROR = Decision(ResponseType.ERROR)
NACK = Decision(ResponseType.NACK)
BUSY = Decision(ResponseType.BUSY)
_STATES = {
    BlockState.PLUGGED: Decision(ResponseType.ACK, state=BlockState.PLUGGED),
    BlockState.UNPLUGGED: Decision(ResponseType.ACK, state=BlockState.UNPLUGGED),
    BlockState.MIXED: Decision(ResponseType.ACK, state=BlockState.MIXED),
}


@dataclass(frozen=True, slots=True)
class RestorePlan:
    """A checked restore: the new bitmap and sizes, and the runs to apply to memory."""

    bitmap: Bitmap
    usable_region_size: int
    requested_size: int
    plugged: list[Run]
    unplugged: list[Run]

    shift: int
    """log2(block size)."""

    def holds_plugged(self, offset: int, size: int) -> bool:
        """Whether the block-aligned byte range holds a block plugged in this plan."""
        return not self.bitmap.all_clear(offset >> self.shift, (offset + size) >> self.shift)


class Rule(StrEnum):
    """Which property rule a value breaks (:class:`PropertyError`)."""

    NOT_AN_INTEGER = "not-an-integer"
    """Not a non-negative integer."""
    BELOW_MINIMUM = "below-minimum"
    """Below the smallest allowed value (the error's ``limit``)."""
    NOT_POWER_OF_TWO = "not-power-of-two"
    BELOW_PAGE_SIZE = "below-page-size"
    """Below the page size of the memory backend (the error's ``limit``)."""
    NOT_BLOCK_MULTIPLE = "not-block-multiple"
    """Not a multiple of the block size (the error's ``limit``)."""
    BEYOND_SIZE = "beyond-size"
    """Larger than the memory backend size (the error's ``limit``)."""
    BEYOND_ADDRESS_SPACE = "beyond-address-space"
    """The region would end beyond the 64-bit address space."""


class PropertyError(InvalidArgument):
    """A device property value is refused: ``prop`` (QEMU's property name, e.g.
    ``"block-size"``), the ``rule`` it breaks and the ``limit`` involved (0 if none), so
    a caller describing the value in its own terms (a scenario file) can word it."""

    def __init__(self, message: str, *, prop: str, rule: Rule, limit: int = 0) -> None:
        super().__init__(message)
        self.prop = prop
        self.rule = rule
        self.limit = limit


def check_requested(name: str, value: int, block_size: int, region_size: int) -> None:
    """Raise PropertyError (``prop`` "requested-size") unless ``value`` is a valid
    requested size: a non-negative integer, a multiple of ``block_size``, at most
    ``region_size``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PropertyError(
            f"{name}: requested-size must be a non-negative integer, got {value!r}",
            prop="requested-size", rule=Rule.NOT_AN_INTEGER,
        )  # fmt: skip
    if value % block_size:
        raise PropertyError(
            f"{name}: requested-size must be a multiple of block-size ({block_size:#x})",
            prop="requested-size", rule=Rule.NOT_BLOCK_MULTIPLE, limit=block_size,
        )  # fmt: skip
    if value > region_size:
        raise PropertyError(
            f"{name}: requested-size cannot exceed the memory backend size",
            prop="requested-size", rule=Rule.BEYOND_SIZE, limit=region_size,
        )  # fmt: skip


class PlugState:
    """Plug state of a device region at ``addr``; see the module rules.

    Raises InvalidArgument for a block size that is not a power of two, a region size
    that is not a multiple of it, a negative usable extent or a bad requested size.
    ``name`` prefixes error messages.
    """

    def __init__(
        self,
        *,
        addr: int,
        region_size: int,
        block_size: int,
        usable_extent: int,
        requested_size: int = 0,
        name: str = "virtio-mem",
    ) -> None:
        if not is_power_of_2(block_size):
            raise InvalidArgument(f"{name}: block-size must be a power of two, got {block_size:#x}")
        if region_size < 0 or region_size % block_size:
            raise InvalidArgument(f"{name}: region size must be a multiple of block-size ({block_size:#x})")
        if usable_extent < 0:
            raise InvalidArgument(f"{name}: negative usable extent")
        check_requested(name, requested_size, block_size, region_size)
        self._name = name
        self._addr = addr
        self._bs = block_size
        self._shift = block_size.bit_length() - 1
        self._region_size = region_size
        self._extent = usable_extent
        self._bitmap = Bitmap(region_size >> self._shift)
        self._requested = requested_size
        self._usable = self.usable_for(requested_size)

    # -- sizes --------------------------------------------------------------------------

    @property
    def addr(self) -> int:
        return self._addr

    @property
    def block_size(self) -> int:
        return self._bs

    @property
    def region_size(self) -> int:
        return self._region_size

    @property
    def nb_blocks(self) -> int:
        return self._bitmap.nbits

    @property
    def usable_extent(self) -> int:
        return self._extent

    @property
    def requested_size(self) -> int:
        return self._requested

    @property
    def usable_region_size(self) -> int:
        return self._usable

    @property
    def plugged_size(self) -> int:
        """popcount(bitmap) * block_size (kept incrementally by the bitmap)."""
        return self._bitmap.count << self._shift

    def usable_for(self, requested: int) -> int:
        """The usable region size that fits ``requested`` (module rules)."""
        if requested == 0:
            return 0
        return min(self._region_size, align_up(requested + self._extent, self._bs))

    def config(self, node: int) -> ConfigSpace:
        """The config space of a device over this core on NUMA node ``node``."""
        sizes = (self.region_size, self.usable_region_size, self.plugged_size, self.requested_size)
        return ConfigSpace(self.block_size, node, self.addr, *sizes)

    def sanity(self, node: int) -> tuple[int, int, int, int]:
        """The sanity block of a device image (addr, region size, block size, ``node``)."""
        return self.addr, self.region_size, self.block_size, node

    def image(self, node: int) -> StateImage:
        """The state image of a device over this core on NUMA node ``node``."""
        sizes = (self.usable_region_size, self.requested_size, self.plugged_size)
        return StateImage(*self.sanity(node), *sizes, self.bitmap_bytes())

    def set_requested(self, value: int) -> bool:
        """Host control: ask for ``value`` bytes. Grows the usable region to fit, never
        shrinks it. Returns whether ``requested_size`` changed. Raises InvalidArgument
        (nothing changed) for an invalid value."""
        check_requested(self._name, value, self._bs, self._region_size)
        if value == self._requested:
            return False
        self._usable = max(self._usable, self.usable_for(value))
        self._requested = value
        return True

    # -- requests -----------------------------------------------------------------------

    def decide(self, req: Request, busy: bool = False) -> Decision:
        """The decision for ``req`` (module rules); ``busy`` says the device cannot change
        state now (a migration or snapshot runs). Changes nothing."""
        return self.decide_fields(req.type, req.addr, req.nb_blocks, busy)

    def decide_fields(self, rtype: RequestType, gpa: int, nb_blocks: int, busy: bool = False) -> Decision:
        """:meth:`decide` for a request given as its fields (``gpa`` and ``nb_blocks``
        within the wire format's ranges, both 0 for UNPLUG_ALL)."""
        if rtype is _RT_PLUG:
            return self.decide_plug(gpa, nb_blocks, busy)
        if rtype is _RT_UNPLUG:
            return self.decide_unplug(gpa, nb_blocks, busy)
        if rtype is _RT_UNPLUG_ALL:
            return self.decide_unplug_all(busy)
        return self.decide_state(gpa, nb_blocks)

    def _blocks(self, gpa: int, nb_blocks: int) -> tuple[int, int] | None:
        """Block indexes [first, last) of a valid request range, or None (ERROR)."""
        size = nb_blocks << self._shift
        start = self._addr
        end = start + self._usable
        if gpa & (self._bs - 1) or size <= 0 or gpa + size > U64_MAX + 1 or not start <= gpa < end:
            return None
        if gpa + size > end:
            return None
        first = (gpa - start) >> self._shift
        return first, first + nb_blocks

    def decide_plug(self, gpa: int, nb_blocks: int, busy: bool = False) -> Decision:
        shift = self._shift
        size = nb_blocks << shift
        offset = gpa - self._addr
        # _blocks() inline (the request path): ERROR for a bad range.
        if (gpa & (self._bs - 1) or size <= 0 or gpa + size > _ADDR_END
                or offset < 0 or offset + size > self._usable):  # fmt: skip
            return ERROR
        if (self._bitmap.count << shift) + size > self._requested:
            return NACK
        first = offset >> shift
        if self._bitmap.count_range(first, first + nb_blocks):
            return ERROR
        if busy:
            return BUSY
        return _tuple_new(Decision, (_ACK, _PLUG, offset, size, None))  # no Python-level __new__

    def decide_unplug(self, gpa: int, nb_blocks: int, busy: bool = False) -> Decision:
        shift = self._shift
        size = nb_blocks << shift
        offset = gpa - self._addr
        if (gpa & (self._bs - 1) or size <= 0 or gpa + size > _ADDR_END
                or offset < 0 or offset + size > self._usable):  # fmt: skip
            return ERROR
        first = offset >> shift
        if self._bitmap.count_range(first, first + nb_blocks) != nb_blocks:
            return ERROR
        if busy:
            return BUSY
        return _tuple_new(Decision, (_ACK, _UNPLUG, offset, size, None))

    def decide_unplug_all(self, busy: bool = False) -> Decision:
        """ACK with the plugged byte count as ``size``; BUSY only if something is plugged."""
        plugged = self.plugged_size
        if plugged and busy:
            return BUSY
        return Decision(_ACK, _UNPLUG_ALL, 0, plugged)

    def decide_state(self, gpa: int, nb_blocks: int) -> Decision:
        blocks = self._blocks(gpa, nb_blocks)
        if blocks is None:
            return ERROR
        count = self._bitmap.count_range(*blocks)
        if count == nb_blocks:
            return _STATES[BlockState.PLUGGED]
        return _STATES[BlockState.UNPLUGGED if count == 0 else BlockState.MIXED]

    def apply(self, decision: Decision) -> None:
        """Record an ACK decision whose effects were performed. Precondition: it was
        decided on the current state (nothing was applied in between)."""
        action = decision.action
        if action is _PLUG:
            first = decision.offset >> self._shift
            self._bitmap.set_range(first, first + (decision.size >> self._shift))
        elif action is _UNPLUG:
            first = decision.offset >> self._shift
            self._bitmap.clear_range(first, first + (decision.size >> self._shift))
        elif action is _UNPLUG_ALL:
            if self._bitmap.count:
                self._bitmap.clear_all()
            self._usable = self.usable_for(self._requested)

    # -- queries ------------------------------------------------------------------------

    def _span(self, offset: int, size: int) -> tuple[int, int]:
        """Blocks covering the byte range, widened outward."""
        return offset >> self._shift, (offset + size + self._bs - 1) >> self._shift

    def _range(self, offset: int, size: int) -> tuple[int, int]:
        if offset < 0 or size < 0 or offset + size > self._region_size:
            raise InvalidArgument(f"{self._name}: range [{offset:#x}, +{size:#x}) outside the region")
        return self._span(offset, size)

    def all_plugged(self, offset: int, size: int) -> bool:
        """Every block touched by the non-empty byte range is plugged and inside the usable
        region (virtio-mem's ``is_populated``). False for an empty range."""
        if size <= 0:
            return False
        first, last = self._range(offset, size)
        return last << self._shift <= self._usable and self._bitmap.all_set(first, last)

    def all_unplugged(self, offset: int, size: int) -> bool:
        """No block touched by the byte range is plugged."""
        first, last = self._range(offset, size)
        return self._bitmap.all_clear(first, last)

    def count_plugged(self, offset: int, size: int) -> int:
        """Plugged bytes in a block-aligned, non-empty byte range; InvalidArgument otherwise."""
        bs = self._bs
        if offset < 0 or size <= 0 or (offset | size) & (bs - 1) or offset + size > self._region_size:
            raise InvalidArgument(
                f"{self._name}: range [{offset:#x}, +{size:#x}) must be non-empty, "
                f"aligned to {bs:#x} and inside the region (size {self._region_size:#x})"
            )
        return self._bitmap.count_range(offset >> self._shift, (offset + size) >> self._shift) << self._shift

    def runs(self, offset: int, size: int, plugged: bool = True) -> Iterator[Run]:
        """Maximal runs (start, end) in region offsets with the given state, ascending,
        clipped to the byte range. Raises InvalidArgument for a range outside the region."""
        first, last = self._range(offset, size)
        if size == 0:
            return
        g = self._shift
        end = offset + size
        runs = self._bitmap.runs(first, last, plugged)
        head = next(runs, None)
        if head is None:
            return
        yield max(head[0] << g, offset), min(head[1] << g, end)
        for s, e in runs:
            e <<= g
            yield s << g, (e if e < end else end)

    def plugged_runs(self) -> list[Run]:
        """Every maximal plugged run as (region offset, size), ascending."""
        g = self._shift
        return [(s << g, (e - s) << g) for s, e in self._bitmap.runs(0, self._bitmap.nbits, True)]

    def bitmap_bytes(self) -> bytes:
        """The bitmap, one bit per block, little-endian 64-bit words (QEMU's layout)."""
        return self._bitmap.to_bytes()

    # -- restore ------------------------------------------------------------------------

    def plan_restore(self, image: StateImage) -> RestorePlan:
        """Check a decoded image's state against this one (module rules); StateError if
        it cannot be restored. The image's geometry must already match this core's."""
        plugged_size, bitmap = image.plugged_size, image.bitmap
        if self.plugged_size:
            raise StateError(f"{self._name} has memory plugged; load needs an empty device")
        try:
            bm = Bitmap.from_bytes(self._bitmap.nbits, bitmap)
        except ValueError as exc:
            raise StateError(f"virtio-mem state bitmap: {exc}") from exc
        if bm.count << self._shift != plugged_size:
            raise StateError(
                f"virtio-mem state: plugged size {plugged_size:#x} disagrees with the bitmap "
                f"({bm.count} blocks)"
            )
        if not bm.all_clear(image.usable_region_size >> self._shift, bm.nbits):
            raise StateError("virtio-mem state: plugged blocks outside the usable region")
        g = self._shift
        return RestorePlan(
            bm,
            image.usable_region_size,
            image.requested_size,
            [(s << g, (e - s) << g) for s, e in bm.runs(0, bm.nbits, True)],
            [(s << g, (e - s) << g) for s, e in bm.runs(0, bm.nbits, False)],
            g,
        )

    def commit_restore(self, plan: RestorePlan) -> None:
        """Install a plan from :meth:`plan_restore` (nothing may have changed since)."""
        self._bitmap = plan.bitmap
        self._usable = plan.usable_region_size
        self._requested = plan.requested_size
