"""The sans-I/O plug-state core against the virtio-mem spec (virtio-mem.md D-* ids)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ramdiscard.errors import InvalidArgument
from ramdiscard.providers.virtio_mem import (
    Action,
    BlockState,
    PlugState,
    Request,
    RequestType,
    ResponseType,
    StateError,
    StateImage,
)
from ramdiscard.units import MiB

BS = 2 * MiB
ADDR = 1 << 32
NB = 64
EXTENT = 8 * BS


def core(requested: int = 16 * BS, nb: int = NB, extent: int = EXTENT) -> PlugState:
    return PlugState(
        addr=ADDR, region_size=nb * BS, block_size=BS, usable_extent=extent, requested_size=requested
    )


def gpa(block: int) -> int:
    return ADDR + block * BS


def snapshot(p: PlugState) -> tuple[bytes, int, int, int]:
    return p.bitmap_bytes(), p.plugged_size, p.requested_size, p.usable_region_size


def plug(p: PlugState, block: int, nb: int) -> None:
    d = p.decide_plug(gpa(block), nb)
    assert d.response is ResponseType.ACK
    p.apply(d)


# -- geometry and sizes ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "msg"),
    [
        ({"block_size": 3 * MiB}, "power of two"),
        ({"region_size": NB * BS + MiB}, "multiple of block-size"),
        ({"usable_extent": -1}, "negative usable extent"),
        ({"requested_size": BS + 1}, "multiple of block-size"),
        ({"requested_size": (NB + 1) * BS}, "cannot exceed"),
        ({"requested_size": -BS}, "non-negative"),
    ],
)
def test_bad_geometry_is_refused(kw: dict[str, int], msg: str) -> None:
    args = {"addr": ADDR, "region_size": NB * BS, "block_size": BS, "usable_extent": EXTENT} | kw
    with pytest.raises(InvalidArgument, match=msg):
        PlugState(**args)  # type: ignore[arg-type]


def test_usable_region_follows_requested_size() -> None:
    p = core(requested=0)
    assert p.usable_region_size == 0
    assert p.set_requested(4 * BS) is True
    assert p.usable_region_size == 4 * BS + EXTENT  # D-CFG-4, D-CFG-6
    assert p.set_requested(4 * BS) is False
    p.set_requested(NB * BS)
    assert p.usable_region_size == NB * BS  # capped at the region


def test_requested_size_write_never_shrinks_usable_region() -> None:
    p = core(requested=32 * BS)
    before = p.usable_region_size
    p.set_requested(2 * BS)
    assert p.requested_size == 2 * BS and p.usable_region_size == before  # D-CFG-8


def test_bad_requested_size_changes_nothing() -> None:
    p = core()
    before = snapshot(p)
    for value in (BS + 1, (NB + 1) * BS, -BS):
        with pytest.raises(InvalidArgument):
            p.set_requested(value)
    assert snapshot(p) == before


def test_plugged_size_is_derived_from_the_bitmap() -> None:
    p = core()
    plug(p, 0, 3)
    plug(p, 8, 2)
    assert p.plugged_size == 5 * BS  # D-CFG-3, D-PLUG-9
    assert p.count_plugged(0, NB * BS) == 5 * BS
    assert list(p.runs(0, NB * BS)) == [(0, 3 * BS), (8 * BS, 10 * BS)]


# -- requests --------------------------------------------------------------------------


@pytest.mark.parametrize("rtype", [RequestType.PLUG, RequestType.UNPLUG, RequestType.STATE])
def test_malformed_ranges_answer_error(rtype: RequestType) -> None:
    p = core()
    usable_blocks = p.usable_region_size // BS
    for addr, nb in [
        (gpa(0) + 4096, 1),  # D-*-3 misaligned
        (gpa(0), 0),  # D-*-4 zero blocks
        (gpa(usable_blocks - 1), 2),  # D-*-5 crosses the usable end
        (gpa(usable_blocks), 1),  # starts outside
        (ADDR - BS, 1),  # below the region
        ((1 << 64) - BS, 0xFFFF),  # 64-bit overflow
    ]:
        d = p.decide(Request(rtype, addr, nb), busy=True)
        assert d.response is ResponseType.ERROR and d.action is Action.NONE and d.state is None


def test_plug_decisions_in_spec_order() -> None:
    p = core(requested=4 * BS)
    before = snapshot(p)
    d = p.decide_plug(gpa(2), 2)
    assert (d.response, d.action, d.offset, d.size) == (ResponseType.ACK, Action.PLUG, 2 * BS, 2 * BS)
    assert snapshot(p) == before  # deciding changes nothing
    assert p.decide_plug(gpa(0), 5).response is ResponseType.NACK  # beyond requested_size
    assert p.decide_plug(gpa(0), 5, busy=True).response is ResponseType.NACK  # NACK before BUSY
    assert p.decide_plug(gpa(2), 2, busy=True).response is ResponseType.BUSY  # D-PLUG-7
    p.apply(d)
    assert p.decide_plug(gpa(3), 1).response is ResponseType.ERROR  # D-PLUG-6
    assert p.decide_plug(gpa(3), 1, busy=True).response is ResponseType.ERROR  # ERROR before BUSY


def test_unplug_decisions() -> None:
    p = core()
    plug(p, 4, 4)
    assert p.decide_unplug(gpa(3), 2).response is ResponseType.ERROR  # D-UNPLUG-6: block 3 unplugged
    assert p.decide_unplug(gpa(4), 2, busy=True).response is ResponseType.BUSY  # D-UNPLUG-7
    d = p.decide_unplug(gpa(5), 2)
    assert (d.response, d.action, d.offset, d.size) == (ResponseType.ACK, Action.UNPLUG, 5 * BS, 2 * BS)
    p.apply(d)
    assert list(p.runs(0, NB * BS)) == [(4 * BS, 5 * BS), (7 * BS, 8 * BS)]
    assert p.plugged_size == 2 * BS  # D-UNPLUG-9


def test_unplug_all_shrinks_usable_region_only_when_applied() -> None:
    p = core(requested=32 * BS)
    plug(p, 30, 2)
    p.set_requested(2 * BS)
    assert p.usable_region_size == 32 * BS + EXTENT  # no shrink on the write
    assert p.decide_unplug_all(busy=True).response is ResponseType.BUSY  # D-UA-3
    d = p.decide_unplug_all()
    assert (d.response, d.action, d.size) == (ResponseType.ACK, Action.UNPLUG_ALL, 2 * BS)
    p.apply(d)
    assert p.plugged_size == 0  # D-UA-5
    assert p.usable_region_size == 2 * BS + EXTENT >= p.requested_size  # D-UA-6, D-CFG-4


def test_unplug_all_with_nothing_plugged_acks_even_when_busy() -> None:
    p = core()
    d = p.decide_unplug_all(busy=True)
    assert (d.response, d.action, d.size) == (ResponseType.ACK, Action.UNPLUG_ALL, 0)


def test_state_answers() -> None:
    p = core()
    plug(p, 2, 2)
    assert p.decide_state(gpa(2), 2).state is BlockState.PLUGGED  # D-ST-7
    assert p.decide_state(gpa(4), 3).state is BlockState.UNPLUGGED  # D-ST-8
    d = p.decide_state(gpa(1), 2)
    assert (d.response, d.state, d.action) == (ResponseType.ACK, BlockState.MIXED, Action.NONE)  # D-ST-9


def test_all_plugged_needs_every_touched_block_inside_the_usable_region() -> None:
    p = core(requested=2 * BS, extent=0)
    plug(p, 0, 2)
    assert p.all_plugged(BS // 2, BS)  # widened to blocks 0..1
    assert not p.all_plugged(BS, 2 * BS)  # block 2 is beyond the usable region
    assert not p.all_plugged(0, 0)
    with pytest.raises(InvalidArgument):
        p.all_plugged(NB * BS - BS, 2 * BS)


def test_count_plugged_needs_an_aligned_range() -> None:
    p = core()
    for offset, size in ((1, BS), (0, 0), (0, BS + 1), ((NB - 1) * BS, 2 * BS)):
        with pytest.raises(InvalidArgument, match="aligned"):
            p.count_plugged(offset, size)


# -- restore ---------------------------------------------------------------------------


def image_of(p: PlugState, **kw: object) -> StateImage:
    fields = {
        "addr": ADDR,
        "region_size": p.region_size,
        "block_size": BS,
        "node": 0,
        "usable_region_size": p.usable_region_size,
        "requested_size": p.requested_size,
        "plugged_size": p.plugged_size,
        "bitmap": p.bitmap_bytes(),
    } | kw
    return StateImage(**fields)  # type: ignore[arg-type]


def test_restore_round_trip() -> None:
    src = core(requested=32 * BS)
    plug(src, 1, 3)
    plug(src, 20, 1)
    dst = core(requested=0)
    plan = dst.plan_restore(image_of(src))
    assert plan.plugged == [(BS, 3 * BS), (20 * BS, BS)]
    assert plan.unplugged[0] == (0, BS) and plan.holds_plugged(0, 2 * BS) and not plan.holds_plugged(0, BS)
    assert snapshot(dst)[1:] == (0, 0, 0)  # planning changes nothing
    dst.commit_restore(plan)
    assert snapshot(dst) == snapshot(src)


def test_restore_refusals_change_nothing() -> None:
    src = core(requested=32 * BS)
    plug(src, 1, 3)
    dst = core(requested=0)
    before = snapshot(dst)
    bad_padding = core(nb=60)
    cases = [
        (image_of(src, plugged_size=2 * BS), "disagrees"),
        (image_of(src, usable_region_size=BS), "outside the usable region"),
        (image_of(src, bitmap=src.bitmap_bytes()[:-1]), "bitmap"),
    ]
    for image, msg in cases:
        with pytest.raises(StateError, match=msg):
            dst.plan_restore(image)
        assert snapshot(dst) == before
    padded = bytearray(bad_padding.bitmap_bytes())
    padded[-1] |= 0x80  # bit 63: beyond a 60-block bitmap
    with pytest.raises(StateError, match="beyond its size"):
        bad_padding.plan_restore(image_of(bad_padding, bitmap=bytes(padded)))
    with pytest.raises(StateError, match="has memory plugged"):
        src.plan_restore(image_of(src))


# -- the core against a set-based model of the spec ---------------------------------------


class Model:
    """The spec's device side, written out with sets of block numbers."""

    def __init__(self, requested: int) -> None:
        self.plugged: set[int] = set()
        self.requested = requested
        self.usable = self.usable_for(requested)

    @staticmethod
    def usable_for(requested: int) -> int:
        if requested == 0:
            return 0
        blocks = -(-(requested + EXTENT) // BS)
        return min(NB, blocks) * BS

    def answer(self, rtype: RequestType, addr: int, nb: int, busy: bool) -> tuple[ResponseType, object]:
        if rtype is RequestType.UNPLUG_ALL:
            if self.plugged and busy:
                return ResponseType.BUSY, None
            return ResponseType.ACK, None
        blocks = set(range((addr - ADDR) // BS, (addr - ADDR) // BS + nb)) if addr >= ADDR else set()
        valid = (
            addr % BS == 0
            and nb > 0
            and addr >= ADDR
            and addr + nb * BS <= ADDR + self.usable
            and addr + nb * BS < 1 << 64
        )
        if not valid:
            return ResponseType.ERROR, None
        if rtype is RequestType.STATE:
            inside = blocks & self.plugged
            state = (
                BlockState.PLUGGED
                if inside == blocks
                else BlockState.UNPLUGGED
                if not inside
                else BlockState.MIXED
            )
            return ResponseType.ACK, state
        if rtype is RequestType.PLUG:
            if (len(self.plugged) + nb) * BS > self.requested:
                return ResponseType.NACK, None
            if blocks & self.plugged:
                return ResponseType.ERROR, None
        elif not blocks <= self.plugged:
            return ResponseType.ERROR, None
        return (ResponseType.BUSY, None) if busy else (ResponseType.ACK, None)

    def apply(self, rtype: RequestType, addr: int, nb: int) -> None:
        blocks = set(range((addr - ADDR) // BS, (addr - ADDR) // BS + nb))
        if rtype is RequestType.PLUG:
            self.plugged |= blocks
        elif rtype is RequestType.UNPLUG:
            self.plugged -= blocks
        elif rtype is RequestType.UNPLUG_ALL:
            self.plugged.clear()
            self.usable = self.usable_for(self.requested)


block = st.integers(min_value=-2, max_value=NB + 2)
count = st.integers(min_value=0, max_value=NB + 2)


class PlugStateMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.core = core(requested=8 * BS)
        self.model = Model(8 * BS)
        self.max_usable = self.core.usable_region_size

    @rule(
        rtype=st.sampled_from(list(RequestType)),
        first=block,
        nb=count,
        misalign=st.sampled_from([0, 0, 0, 4096]),
        busy=st.booleans(),
        effects_ok=st.booleans(),
    )
    def request(
        self, rtype: RequestType, first: int, nb: int, misalign: int, busy: bool, effects_ok: bool
    ) -> None:
        addr = max(0, ADDR + first * BS + misalign)
        if rtype is RequestType.UNPLUG_ALL:
            addr, nb = 0, 0
        before = snapshot(self.core)
        d = self.core.decide(Request(rtype, addr, nb), busy)
        assert snapshot(self.core) == before
        response, state = self.model.answer(rtype, addr, nb, busy)
        assert (d.response, d.state) == (response, state)
        if d.action is Action.NONE:
            return
        if effects_ok:  # the device applies only when every effect succeeded
            self.core.apply(d)
            self.model.apply(rtype, addr, nb)
        if rtype is not RequestType.UNPLUG_ALL:
            assert (d.offset, d.size) == (addr - ADDR, nb * BS)

    @rule(blocks=st.integers(min_value=0, max_value=NB))
    def set_requested(self, blocks: int) -> None:
        self.core.set_requested(blocks * BS)
        self.model.requested = blocks * BS
        self.model.usable = max(self.model.usable, Model.usable_for(blocks * BS))

    @precondition(lambda self: self.core.plugged_size == 0)
    @rule(src_blocks=st.sets(st.integers(min_value=0, max_value=NB - 1), max_size=8))
    def restore(self, src_blocks: set[int]) -> None:
        src = core(requested=NB * BS)
        for b in src_blocks:
            plug(src, b, 1)
        self.core.commit_restore(self.core.plan_restore(image_of(src)))
        self.model.plugged = set(src_blocks)
        self.model.requested, self.model.usable = src.requested_size, src.usable_region_size

    @invariant()
    def matches_model(self) -> None:
        p, m = self.core, self.model
        assert p.plugged_size == len(m.plugged) * BS
        assert p.requested_size == m.requested and p.usable_region_size == m.usable
        runs = {b for s, e in p.runs(0, NB * BS) for b in range(s // BS, e // BS)}
        assert runs == m.plugged

    @invariant()
    def spec_invariants(self) -> None:
        p = self.core
        assert p.usable_region_size >= p.requested_size  # D-CFG-4
        assert p.usable_region_size % BS == 0 and p.plugged_size % BS == 0  # D-CFG-6
        tail = p.region_size - p.usable_region_size
        assert tail == 0 or p.all_unplugged(p.usable_region_size, tail)


PlugStateMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestPlugState = PlugStateMachine.TestCase
