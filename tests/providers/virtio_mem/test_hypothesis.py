"""Property tests against an independent model (spec_model.SpecModel, written from the
virtio-mem spec): every response type, every STATE answer, every byte of the 56-byte config
and every listener's view is predicted, for aligned, unaligned and wild addresses, with
usable regions that grow on requested-size changes and shrink on UNPLUG_ALL."""

from __future__ import annotations

import errno
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ramdiscard import faults
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import DeviceBroken, ProtocolError, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB

from .conftest import ADDR, BS, FakeRam, RecordingListener
from .spec_model import ACK, BUSY, NACK, Broken, SpecModel

SIZE = 64 * MiB
NB = SIZE // BS
U64_MAX = (1 << 64) - 1
# Usable extents smaller than the region make the usable size move; 256 MiB (x86's
# default) pins it to the whole region as soon as anything is requested.
EXTENTS = (0, 4 * MiB, 16 * MiB, 256 * MiB)

aligned = st.integers(-2, NB + 2).map(lambda i: ADDR + i * BS)
unaligned = st.tuples(st.integers(-1, NB), st.integers(1, BS // 4096 - 1)).map(
    lambda t: ADDR + t[0] * BS + t[1] * 4096
)


def _weighted(*choices: tuple[int, st.SearchStrategy[int]]) -> st.SearchStrategy[int]:
    """Pick a strategy with the given weights (one_of alone does not weight branches)."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


addresses = _weighted((6, aligned), (2, unaligned), (1, st.integers(0, U64_MAX)))
nb_blocks = _weighted((7, st.integers(1, 8)), (1, st.just(0)), (1, st.sampled_from([NB, 0xFFFF])))


def _device(ram: Any, requested: int, extent: int) -> VirtioMem:
    mr = MemoryRegion.new_ram("vmem-prop", ram)
    return VirtioMem(
        mr,
        addr=ADDR,
        block_size=BS,
        requested_size=requested,
        policy=DiscardPolicy(),
        usable_extent=extent,
        prealloc=True,
    )


def _request(rtype: int, addr: int, nb: int, pad: bytes) -> bytes:
    return struct.pack("<H", rtype) + pad[:6] + struct.pack("<QH", addr, nb) + pad[6:]


request_types = _weighted((4, st.just(0)), (3, st.just(1)), (1, st.just(2)), (2, st.just(3)))
well_formed = st.builds(_request, request_types, addresses, nb_blocks, st.binary(min_size=12, max_size=24))
violations = st.one_of(
    st.builds(_request, st.integers(4, 0xFFFF), addresses, nb_blocks, st.binary(min_size=12, max_size=12)),
    st.binary(max_size=23),
)
requests = st.lists(st.integers(0, 9).flatmap(lambda i: violations if i == 0 else well_formed), max_size=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests, st.integers(0, NB), st.sampled_from(EXTENTS))
def test_random_requests_match_the_model(data: list[bytes], requested: int, extent: int) -> None:
    dev = _device(FakeRam(SIZE), requested * BS, extent)
    model = SpecModel(ADDR, BS, SIZE, requested * BS, extent)
    try:
        assert dev.config_bytes() == model.config()
        for raw in data:
            was_broken = model.broken
            try:
                expected = model.request(raw)
            except Broken:
                exc_type = DeviceBroken if was_broken else ProtocolError
                try:
                    dev.handle_request(raw)
                except exc_type as exc:
                    assert was_broken or not isinstance(exc, DeviceBroken)
                else:
                    raise AssertionError(f"{raw!r} must get no answer") from None
                assert dev.broken
                dev.device_reset()
                model.device_reset()
                continue
            out = dev.handle_request(raw)
            assert len(out) == 10
            rtype, state = struct.unpack("<H6xH", out)
            assert (rtype, state if expected[1] is not None else None) == expected, raw
            assert dev.config_bytes() == model.config()
    finally:
        dev.unrealize()


class DeviceMachine(RuleBasedStateMachine):
    """Requests with and without faults, requested-size changes, resets and listener churn,
    each outcome predicted by the model."""

    backing = "fake"

    @initialize(requested=st.integers(0, NB), extent=st.sampled_from(EXTENTS))
    def setup(self, requested: int, extent: int) -> None:
        self.ram: Any = FakeRam(SIZE) if self.backing == "fake" else RamBlock(SIZE, self.backing)
        self.dev = _device(self.ram, requested * BS, extent)
        self.model = SpecModel(ADDR, BS, SIZE, requested * BS, extent)
        self.busy = False
        self.dev.set_busy_predicate(lambda: self.busy)
        self.listeners: list[RecordingListener] = []

    def teardown(self) -> None:
        dev = getattr(self, "dev", None)
        if dev is None:
            return
        for rdl in dev.listeners:
            dev.unregister_listener(rdl)
        dev.unrealize()
        close = getattr(self.ram, "close", None)
        if close is not None:
            close()

    def _touch(self) -> None:
        # The guest writes plugged memory, so residency is real and must vanish on unplug.
        if self.backing != "fake":
            for block in self.model.plugged:
                self.ram.view[block * BS] = 1
                self.ram.view[block * BS + BS - 1] = 1

    @rule(addr=addresses, nb=nb_blocks, fault=st.sampled_from([None, None, "busy", "populate", "listener"]))
    def plug(self, addr: int, nb: int, fault: str | None) -> None:
        expected = self.model.plug(addr, nb, can=fault is None)
        if fault == "listener":
            armed = [False]
            refusing = RecordingListener(refuse=lambda s: armed[0])
            self.dev.register_listener(refusing, MemoryRegionSection(self.dev.region, 0, SIZE))
            armed[0] = True
            resp = self.dev.plug(addr, nb)
            armed[0] = False
            self.dev.unregister_listener(refusing)
        elif fault == "populate":
            with faults.inject("populate", errno=errno.ENOMEM) as plan:
                resp = self.dev.plug(addr, nb)
            assert plan.fired == (1 if expected == BUSY else 0)
        elif fault == "busy":
            self.busy = True
            try:
                resp = self.dev.plug(addr, nb)
            finally:
                self.busy = False
        else:
            resp = self.dev.plug(addr, nb)
        assert resp == expected, (hex(addr), nb, fault)
        self._touch()

    @rule(i=st.integers(0, NB - 1), nb=st.integers(1, 8))
    def plug_free_block(self, i: int, nb: int) -> None:
        """Start at an unplugged block: what a driver does (ACK, or NACK past the request)."""
        free = [b for b in range(NB) if b not in self.model.plugged]
        if free:
            self.plug(ADDR + free[i % len(free)] * BS, nb, None)

    @precondition(lambda self: bool(self.model.plugged))
    @rule(i=st.integers(0, NB - 1), nb=st.integers(1, 4))
    def unplug_plugged_block(self, i: int, nb: int) -> None:
        plugged = sorted(self.model.plugged)
        self.unplug(ADDR + plugged[i % len(plugged)] * BS, nb, None)

    @rule(addr=addresses, nb=nb_blocks, fault=st.sampled_from([None, None, "busy", "discard"]))
    def unplug(self, addr: int, nb: int, fault: str | None) -> None:
        expected = self.model.unplug(addr, nb, can=fault is None)
        if fault == "discard":
            with faults.inject("discard"):
                resp = self.dev.unplug(addr, nb)
        elif fault == "busy":
            self.busy = True
            try:
                resp = self.dev.unplug(addr, nb)
            finally:
                self.busy = False
        else:
            resp = self.dev.unplug(addr, nb)
        assert resp == expected, (hex(addr), nb, fault)

    @rule(fault=st.sampled_from([None, None, "busy", "discard"]))
    def unplug_all(self, fault: str | None) -> None:
        expected = self.model.unplug_all(can=fault is None)
        if fault == "discard":
            with faults.inject("discard"):
                resp = self.dev.unplug_all()
        elif fault == "busy":
            self.busy = True
            try:
                resp = self.dev.unplug_all()
            finally:
                self.busy = False
        else:
            resp = self.dev.unplug_all()
        assert resp == expected

    @rule(addr=addresses, nb=nb_blocks)
    def state(self, addr: int, nb: int) -> None:
        assert self.dev.state(addr, nb) == self.model.state(addr, nb)

    @rule(blocks=st.integers(0, NB))
    def set_requested(self, blocks: int) -> None:
        self.dev.requested_size = blocks * BS
        self.model.set_requested(blocks * BS)

    @rule(wakeup=st.booleans(), fail=st.booleans())
    def system_reset(self, wakeup: bool, fail: bool) -> None:
        if fail:
            with faults.inject("discard"):
                self.dev.system_reset(wakeup=wakeup)
        else:
            self.dev.system_reset(wakeup=wakeup)
        self.model.system_reset(wakeup=wakeup, can=not fail)

    @rule(data=violations)
    def protocol_violation(self, data: bytes) -> None:
        try:
            self.model.request(data)
        except Broken:
            pass
        else:
            return  # a well-formed request; the other rules cover those
        try:
            self.dev.handle_request(data)
        except DeviceBroken:
            raise AssertionError("the first violation is a ProtocolError, not DeviceBroken") from None
        except ProtocolError:
            pass
        else:
            raise AssertionError(f"{data!r} must get no answer")
        try:
            self.dev.handle_request(_request(3, ADDR, 1, bytes(12)))
        except DeviceBroken:
            pass
        else:
            raise AssertionError("a broken device must not answer")
        self.dev.device_reset()
        self.model.device_reset()
        assert not self.dev.broken

    @rule()
    def device_reset(self) -> None:
        self.dev.device_reset()
        self.model.device_reset()

    @rule(start=st.integers(0, SIZE // 4096 - 1), pages=st.integers(1, SIZE // 4096), dd=st.booleans())
    def register(self, start: int, pages: int, dd: bool) -> None:
        size = min(pages, SIZE // 4096 - start) * 4096
        rdl = RecordingListener(double_discard=dd)
        self.dev.register_listener(
            rdl, MemoryRegionSection(self.dev.region, start * 4096, size, ADDR + start * 4096)
        )
        self.listeners.append(rdl)

    @precondition(lambda self: bool(self.listeners))
    @rule(i=st.integers(0, 100))
    def unregister(self, i: int) -> None:
        rdl = self.listeners.pop(i % len(self.listeners))
        self.dev.unregister_listener(rdl)
        assert rdl.populated == set()

    @invariant()
    def config_matches_model(self) -> None:
        assert self.dev.config_bytes() == self.model.config()
        blocks = {off // BS + i for off, size in self.dev.plugged_ranges() for i in range(size // BS)}
        assert blocks == self.model.plugged

    @invariant()
    def listener_views_match_model(self) -> None:
        for rdl in self.listeners:
            s = rdl.section
            assert s is not None
            first, last = s.offset_within_region // BS, -(-s.end // BS)
            assert rdl.populated == {b for b in self.model.plugged if first <= b < last}

    @invariant()
    def unplugged_not_resident(self) -> None:
        if self.backing == "fake":
            return
        for block in range(NB):
            if block not in self.model.plugged:
                assert self.ram.resident_bytes(block * BS, BS) == 0, block


TestDeviceMachineFake = DeviceMachine.TestCase
TestDeviceMachineFake.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


class RealAnonymousMachine(DeviceMachine):
    backing = "anonymous"


class RealMemfdMachine(DeviceMachine):
    backing = "memfd"


TestDeviceMachineAnonymous = RealAnonymousMachine.TestCase
TestDeviceMachineAnonymous.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestDeviceMachineMemfd = RealMemfdMachine.TestCase
TestDeviceMachineMemfd.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


def test_usable_region_follows_requested_size_and_shrinks_on_unplug_all() -> None:
    """A scripted run where the usable size moves: grows with requested_size, never
    shrinks on a smaller request (D-CFG-8), shrinks back on UNPLUG_ALL (D-UA-6)."""
    extent = 4 * MiB
    dev = _device(FakeRam(SIZE), 8 * MiB, extent)
    model = SpecModel(ADDR, BS, SIZE, 8 * MiB, extent)
    try:
        assert model.usable_region_size == 12 * MiB
        steps: list[tuple[str, int, int]] = [
            ("plug", ADDR, 4),  # meets requested_size exactly
            ("plug", ADDR + 4 * BS, 1),  # beyond requested_size: NACK
            ("plug", ADDR + 6 * BS, 1),  # outside the usable region: ERROR
            ("requested", 32 * MiB, 0),
            ("plug", ADDR + 16 * BS, 2),  # inside the grown usable region
            ("requested", 8 * MiB, 0),  # does not shrink the usable region
            ("state", ADDR + 16 * BS, 2),
            ("unplug_all", 0, 0),
            ("state", ADDR + 16 * BS, 2),  # now outside the usable region: ERROR
            ("plug", ADDR, 4),
        ]
        expected_usable = [12, 12, 12, 36, 36, 36, 36, 12, 12, 12]
        answers = []
        for (op, a, n), usable in zip(steps, expected_usable, strict=True):
            if op == "plug":
                got, want = dev.plug(a, n), model.plug(a, n)
            elif op == "state":
                got, want = dev.state(a, n), model.state(a, n)
            elif op == "unplug_all":
                got, want = dev.unplug_all(), model.unplug_all()
            else:
                dev.requested_size = a
                model.set_requested(a)
                got = want = None
            assert got == want, (op, a, n)
            answers.append(want)
            assert model.usable_region_size == usable * MiB
            assert dev.config_bytes() == model.config(), (op, a, n)
        assert answers[:3] == [ACK, NACK, 3]
    finally:
        dev.unrealize()
