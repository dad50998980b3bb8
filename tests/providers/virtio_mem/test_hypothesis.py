"""Property tests: arbitrary bytes never raise anything undocumented; random valid
operation sequences keep every invariant (sizes, listener views, host residency)."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from ramdiscard import faults
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import DeviceBroken, ProtocolError, ResponseType, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB

from .conftest import ADDR, BS, HAVE_HOSTMEM, FakeRam, RecordingListener, expected_view

SIZE = 64 * MiB
NB = SIZE // BS


def _fresh_device() -> VirtioMem:
    mr = MemoryRegion.new_ram("fuzz", FakeRam(SIZE))
    return VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE // 2, policy=DiscardPolicy())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.binary(max_size=40)
        | st.builds(
            lambda t, a, n, pad: struct.pack("<H", t) + pad[:6] + struct.pack("<QH", a, n) + pad[6:],
            st.integers(0, 5),
            st.one_of(st.integers(0, (1 << 64) - 1), st.integers(ADDR - 4 * BS, ADDR + SIZE + 4 * BS)),
            st.integers(0, 0xFFFF) | st.integers(0, 40),
            st.binary(min_size=12, max_size=12),
        ),
        max_size=25,
    )
)
def test_random_requests_raise_only_protocol_errors(requests: list[bytes]) -> None:
    dev = _fresh_device()
    try:
        for data in requests:
            try:
                out = dev.handle_request(data)
            except DeviceBroken:
                assert dev.broken
                dev.device_reset()
                continue
            except ProtocolError:
                assert dev.broken
                continue
            assert len(out) == 10 and struct.unpack_from("<H", out)[0] in (0, 1, 2, 3)
            assert dev.plugged_size == dev.count_populated(0, SIZE)
            assert dev.plugged_size <= dev.requested_size or dev.plugged_size == 0
    finally:
        dev.unrealize()


class DeviceMachine(RuleBasedStateMachine):
    """Random valid requests, requested-size changes, resets, listener churn, faults."""

    backing = "fake"

    @initialize()
    def setup(self) -> None:
        if self.backing == "fake":
            ram = FakeRam(SIZE)
        else:
            from ramdiscard.hostmem import RamBlock

            ram = RamBlock(SIZE, self.backing)
        self.ram = ram
        mr = MemoryRegion.new_ram("sm", ram)
        self.dev = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE // 2, policy=DiscardPolicy())
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
            for start, size in self.dev.plugged_ranges():
                self.ram.view[start] = 1
                self.ram.view[start + size - 1] = 1

    @rule(
        first=st.integers(0, NB - 1),
        nb=st.integers(1, 8),
        fault=st.sampled_from([None, "populate", "listener"]),
    )
    def plug(self, first: int, nb: int, fault: str | None) -> None:
        nb = min(nb, NB - first)
        before = self.dev.plugged_size
        if fault == "listener":
            armed = [False]
            refusing = RecordingListener(refuse=lambda s: armed[0])
            self.dev.register_listener(refusing, MemoryRegionSection(self.dev.region, 0, SIZE))
            armed[0] = True
            resp = self.dev.plug(ADDR + first * BS, nb)
            armed[0] = False
            self.dev.unregister_listener(refusing)
            assert resp in (ResponseType.BUSY, ResponseType.ERROR, ResponseType.NACK)
        elif fault == "populate":
            self.dev._prealloc = True
            try:
                with faults.inject("populate", errno=errno.ENOMEM):
                    resp = self.dev.plug(ADDR + first * BS, nb)
            finally:
                self.dev._prealloc = False
            assert resp is not ResponseType.ACK
        else:
            resp = self.dev.plug(ADDR + first * BS, nb)
        if resp is not ResponseType.ACK:
            assert self.dev.plugged_size == before
        self._touch()

    @rule(first=st.integers(0, NB - 1), nb=st.integers(1, 8), fail=st.booleans())
    def unplug(self, first: int, nb: int, fail: bool) -> None:
        nb = min(nb, NB - first)
        before = self.dev.plugged_size
        if fail:
            with faults.inject("discard"):
                resp = self.dev.unplug(ADDR + first * BS, nb)
            assert resp is not ResponseType.ACK
            assert self.dev.plugged_size == before
        else:
            resp = self.dev.unplug(ADDR + first * BS, nb)

    @rule(fail=st.booleans())
    def unplug_all(self, fail: bool) -> None:
        if fail:
            with faults.inject("discard"):
                self.dev.unplug_all()
        else:
            assert self.dev.unplug_all() is ResponseType.ACK

    @rule(blocks=st.integers(0, NB))
    def set_requested(self, blocks: int) -> None:
        self.dev.requested_size = blocks * BS

    @rule(wakeup=st.booleans())
    def system_reset(self, wakeup: bool) -> None:
        self.dev.system_reset(wakeup=wakeup)

    @rule()
    def device_reset(self) -> None:
        before = self.dev.bitmap_bytes()
        self.dev.device_reset()
        assert self.dev.bitmap_bytes() == before

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

    @rule(first=st.integers(0, NB - 1), nb=st.integers(1, 8))
    def state(self, first: int, nb: int) -> None:
        self.dev.state(ADDR + first * BS, min(nb, NB - first))

    @invariant()
    def sizes_consistent(self) -> None:
        dev = self.dev
        assert dev.plugged_size == dev.count_populated(0, SIZE)
        assert dev.plugged_size % BS == 0 and dev.usable_region_size % BS == 0
        assert dev.usable_region_size >= min(dev.requested_size, SIZE) or dev.usable_region_size == SIZE
        assert (
            dev.count_populated(dev.usable_region_size, SIZE - dev.usable_region_size) == 0
            if (dev.usable_region_size < SIZE)
            else True
        )

    @invariant()
    def listener_views(self) -> None:
        for rdl in self.listeners:
            assert rdl.section is not None
            assert rdl.populated == expected_view(self.dev, rdl.section)

    @invariant()
    def unplugged_not_resident(self) -> None:
        if self.backing == "fake":
            return
        for start, end in self.dev.discarded_runs():
            assert self.ram.resident_bytes(start, end - start) == 0, (start, end)


TestDeviceMachineFake = DeviceMachine.TestCase
TestDeviceMachineFake.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)


class RealAnonymousMachine(DeviceMachine):
    backing = "anonymous"


class RealMemfdMachine(DeviceMachine):
    backing = "memfd"


_real = pytest.mark.skipif(not HAVE_HOSTMEM, reason="ramdiscard.hostmem not available yet")
TestDeviceMachineAnonymous = _real(RealAnonymousMachine.TestCase)
TestDeviceMachineAnonymous.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
TestDeviceMachineMemfd = _real(RealMemfdMachine.TestCase)
TestDeviceMachineMemfd.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)
_ = assume
