"""GuestDriver: request pattern of the Linux driver, and its reaction to NACK/BUSY/ERROR."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.guest import DriverState, Exchange, GuestDriver, ReqType, RespType
from ramdiscard.interfaces import Virtqueue
from ramdiscard.units import GiB, MiB
from tests.conftest import sample_trace

ADDR = 0x1_0000_0000


@dataclass
class FakeDevice:
    """A scripted virtio-mem device: plugs what it is asked unless a scripted answer says otherwise."""

    block_size: int = 2 * MiB
    region_size: int = 4 * GiB
    requested: int = 0
    plugged: set[int] = field(default_factory=set)
    script: list[int] = field(default_factory=list)
    seen: list[tuple[int, int, int]] = field(default_factory=list)
    usable: int | None = None

    def config_bytes(self) -> bytes:
        usable = self.usable if self.usable is not None else min(self.region_size, self.requested + 256 * MiB)
        plugged = len(self.plugged) * self.block_size
        return struct.pack(
            "<QH6xQQQQQ", self.block_size, 0, ADDR, self.region_size, usable, plugged, self.requested
        )

    def process_queue(self, vq: Virtqueue) -> None:
        while (element := vq.pop()) is not None:
            vq.push(element, self.handle_request(element.request))
        vq.notify()

    def handle_request(self, req: bytes) -> bytes:
        rtype, addr, nb = struct.unpack_from("<H6xQH", req)
        self.seen.append((rtype, addr, nb))
        if self.script:
            return struct.pack("<H6xH", self.script.pop(0), 0)
        blocks = {(addr - ADDR) // self.block_size + i for i in range(nb)}
        if rtype == 0:
            if (len(self.plugged) + nb) * self.block_size > self.requested:
                return struct.pack("<H6xH", 1, 0)
            assert not blocks & self.plugged, "driver plugged a plugged block"
            self.plugged |= blocks
        elif rtype == 1:
            assert blocks <= self.plugged, "driver unplugged an unplugged block"
            self.plugged -= blocks
        elif rtype == 2:
            self.plugged.clear()
        return struct.pack("<H6xH", 0, 0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _resize(dev: FakeDevice, drv: GuestDriver, size: int) -> list[tuple[str, int, int]]:
    dev.requested = size
    drv.config_changed()
    return [(e.type.name, e.addr, e.nb_blocks) for e in drv.run_until_converged(10_000)]


def test_matches_the_qemu_sample_trace_with_the_real_device() -> None:
    from ramdiscard.hostmem import RamBlock
    from ramdiscard.memory.region import MemoryRegion
    from ramdiscard.providers import virtio_mem
    from ramdiscard.rdm.policy import DiscardPolicy
    from ramdiscard.replay.events import PlugRequest, UnplugRequest, parse_trace_file

    log = parse_trace_file(sample_trace())
    expected = [
        ("PLUG" if isinstance(e, PlugRequest) else "UNPLUG", e.addr, e.nb_blocks)
        for e in log.events
        if isinstance(e, PlugRequest | UnplugRequest)
    ]
    block = RamBlock(4 * GiB)
    try:
        dev = virtio_mem.VirtioMem(
            MemoryRegion.new_ram("vmem0mem", block), addr=ADDR, block_size=2 * MiB, policy=DiscardPolicy()
        )
        drv = GuestDriver(dev)
        got: list[tuple[str, int, int]] = []
        for size in (1 * GiB, 256 * MiB, 0):
            dev.requested_size = size
            drv.config_changed()
            for ex in drv.run_until_converged():
                assert ex.response is RespType.ACK
                got.append((ex.type.name, ex.addr, ex.nb_blocks))
        assert got == expected
        assert dev.plugged_size == 0 and drv.state is DriverState.CONVERGED
        dev.unrealize()
    finally:
        block.close()


def test_sbm_plugs_ascending_in_memory_block_runs_and_unplugs_descending() -> None:
    dev = FakeDevice()
    drv = GuestDriver(dev)
    reqs = _resize(dev, drv, 300 * MiB)
    assert reqs == [("PLUG", ADDR, 64), ("PLUG", ADDR + 128 * MiB, 64), ("PLUG", ADDR + 256 * MiB, 22)]
    # partial block first: 4 single sub-blocks from the top of the partial block
    reqs = _resize(dev, drv, 292 * MiB)
    assert [r[0] for r in reqs] == ["UNPLUG"] * 4
    assert [r[1] for r in reqs] == [ADDR + 256 * MiB + i * 2 * MiB for i in (21, 20, 19, 18)]
    assert all(r[2] == 1 for r in reqs)
    # plugging again fills the partial block from its first unplugged sub-block
    assert _resize(dev, drv, 300 * MiB) == [("PLUG", ADDR + 256 * MiB + 18 * 2 * MiB, 4)]
    # a whole block is unplugged in one request when at least a block must go
    reqs = _resize(dev, drv, 128 * MiB)
    assert reqs[0] == ("UNPLUG", ADDR + 256 * MiB + 21 * 2 * MiB, 1)
    assert ("UNPLUG", ADDR + 128 * MiB, 64) in reqs


def test_bbm_for_large_blocks() -> None:
    dev = FakeDevice(block_size=128 * MiB)
    drv = GuestDriver(dev)
    assert not drv.sbm
    assert _resize(dev, drv, 384 * MiB) == [("PLUG", ADDR + i * 128 * MiB, 1) for i in range(3)]
    assert _resize(dev, drv, 128 * MiB) == [("UNPLUG", ADDR + i * 128 * MiB, 1) for i in (2, 1)]


def test_sub_block_is_at_least_2m_for_1m_device_blocks() -> None:
    dev = FakeDevice(block_size=1 * MiB)
    drv = GuestDriver(dev)
    assert _resize(dev, drv, 131 * MiB) == [("PLUG", ADDR, 128), ("PLUG", ADDR + 128 * MiB, 2)]


def test_unplug_all_first_when_something_is_plugged() -> None:
    dev = FakeDevice(requested=64 * MiB, plugged={0, 1, 2})
    drv = GuestDriver(dev)
    out = drv.run_until_converged()
    assert out[0].type is ReqType.UNPLUG_ALL and out[0].response is RespType.ACK
    assert [e.type for e in out[1:]] == [ReqType.PLUG]
    assert len(dev.plugged) == 32


def test_plug_nack_rereads_config_and_stops_when_satisfied() -> None:
    dev = FakeDevice()
    drv = GuestDriver(dev)
    dev.requested = 256 * MiB
    drv.config_changed()
    dev.script = [RespType.NACK]
    dev.requested = 128 * MiB  # host lowered the request after the notification
    ex = drv.step()
    assert ex is not None and ex.response is RespType.NACK
    out = drv.run_until_converged()
    assert [(e.type, e.nb_blocks) for e in out] == [(ReqType.PLUG, 64)]
    assert drv.state is DriverState.CONVERGED


def test_busy_arms_retry_timer_with_backoff() -> None:
    clock = Clock()
    dev = FakeDevice()
    drv = GuestDriver(dev, clock=clock)
    dev.requested = 128 * MiB
    drv.config_changed()
    dev.script = [RespType.BUSY, RespType.BUSY]
    assert drv.step().response is RespType.BUSY  # type: ignore[union-attr]
    assert drv.state is DriverState.WAITING and drv.retry_at == 50.0
    assert drv.step() is None
    clock.now = 50.0
    assert drv.step().response is RespType.BUSY  # type: ignore[union-attr]
    assert drv.retry_at == 150.0  # doubled: 100 s
    clock.now = 150.0
    assert [e.response for e in drv.run_until_converged()] == [RespType.ACK]
    assert drv.state is DriverState.CONVERGED


def test_config_change_cancels_the_retry_timer() -> None:
    clock = Clock()
    dev = FakeDevice()
    drv = GuestDriver(dev, clock=clock)
    dev.requested = 128 * MiB
    drv.config_changed()
    dev.script = [RespType.BUSY]
    drv.step()
    assert drv.state is DriverState.WAITING
    drv.config_changed()
    assert [e.response for e in drv.run_until_converged()] == [RespType.ACK]


@pytest.mark.parametrize("rtype", ["plug", "unplug"])
def test_error_breaks_the_driver(rtype: str) -> None:
    dev = FakeDevice()
    drv = GuestDriver(dev)
    if rtype == "unplug":
        _resize(dev, drv, 128 * MiB)
        dev.requested = 0
    else:
        dev.requested = 128 * MiB
    drv.config_changed()
    dev.script = [RespType.ERROR]
    assert drv.step().response is RespType.ERROR  # type: ignore[union-attr]
    assert drv.state is DriverState.BROKEN
    before = len(dev.seen)
    drv.config_changed()
    assert drv.run_until_converged() == [] and len(dev.seen) == before


def test_unplug_all_error_only_retries() -> None:
    clock = Clock()
    dev = FakeDevice(plugged={0})
    drv = GuestDriver(dev, clock=clock)
    dev.script = [RespType.ERROR]
    assert drv.step().response is RespType.ERROR  # type: ignore[union-attr]
    assert drv.state is DriverState.WAITING
    clock.now = 60
    assert drv.step().type is ReqType.UNPLUG_ALL  # type: ignore[union-attr]


def test_only_whole_memory_blocks_inside_the_usable_region() -> None:
    dev = FakeDevice(usable=200 * MiB)
    drv = GuestDriver(dev)
    reqs = _resize(dev, drv, 1 * GiB)
    assert reqs == [("PLUG", ADDR, 64)]  # the second memory block is not wholly usable
    assert drv.state is DriverState.CONVERGED


@given(st.lists(st.integers(0, 32).map(lambda n: n * 64 * MiB), min_size=1, max_size=8))
def test_converges_to_every_request(sizes: list[int]) -> None:
    dev = FakeDevice(region_size=2 * GiB)
    drv = GuestDriver(dev)
    for size in sizes:
        reqs = _resize(dev, drv, size)
        assert len(dev.plugged) * dev.block_size == size == drv.plugged_size
        assert all(nb * dev.block_size <= 128 * MiB for _, _, nb in reqs)
        plugs = [a for t, a, _ in reqs if t == "PLUG"]
        unplugs = [a for t, a, _ in reqs if t == "UNPLUG"]
        assert plugs == sorted(plugs) and unplugs == sorted(unplugs, reverse=True)
        assert sum(s for _, s in drv.plugged_ranges()) == size


def _expected_next(plugged: set[int], requested: int, usable: int) -> tuple[str, int, int] | None:
    """The module rules for SBM with 2 MiB sub-blocks and 128 MiB memory blocks, written
    over a set of plugged sub-block indices: what the next request must be."""
    per, sub = 64, 2 * MiB
    groups = [set(range(g * per, (g + 1) * per)) & plugged for g in range(16)]
    diff = requested - len(plugged) * sub
    if diff > 0:
        nb = diff // sub
        if nb == 0:
            return None
        fits = min(16, usable // (128 * MiB))
        partial = [g for g in range(fits) if 0 < len(groups[g]) < per]
        empty = [g for g in range(fits) if not groups[g]]
        if partial:
            g = partial[0]
            first = min(set(range(g * per, (g + 1) * per)) - plugged)
            run = 1
            while run < nb and first + run < (g + 1) * per and first + run not in plugged:
                run += 1
            return "PLUG", ADDR + first * sub, run
        if empty:
            return "PLUG", ADDR + empty[0] * per * sub, min(nb, per)
        return None
    nb = -diff // sub
    if nb == 0:
        return None
    partial = [g for g in reversed(range(16)) if 0 < len(groups[g]) < per]
    full = [g for g in reversed(range(16)) if len(groups[g]) == per]
    if partial:
        return "UNPLUG", ADDR + max(groups[partial[0]]) * sub, 1
    if full:
        g = full[0]
        if nb >= per:
            return "UNPLUG", ADDR + g * per * sub, per
        return "UNPLUG", ADDR + ((g + 1) * per - 1) * sub, 1
    return None


@given(
    st.lists(st.sampled_from(["empty", "full", "some"]), min_size=16, max_size=16),
    st.lists(st.integers(0, 63), max_size=64),
    st.integers(0, 1024),
)
def test_next_request_follows_the_order_rules(
    kinds: list[str], some: list[int], requested_blocks: int
) -> None:
    plugged: set[int] = set()
    for g, kind in enumerate(kinds):
        if kind == "full":
            plugged |= set(range(g * 64, (g + 1) * 64))
        elif kind == "some":
            plugged |= {g * 64 + i for i in some}
    dev = FakeDevice(region_size=2 * GiB, plugged=set(plugged))
    drv = GuestDriver(dev)
    runs = sorted(plugged)
    drv.assume_plugged([(ADDR + b * 2 * MiB, 2 * MiB) for b in runs])
    dev.requested = requested_blocks * 2 * MiB
    usable = min(dev.region_size, dev.requested + 256 * MiB)
    drv.config_changed()
    ex = drv.step()
    got = None if ex is None else (ex.type.name, ex.addr, ex.nb_blocks)
    assert got == _expected_next(plugged, dev.requested, usable)


@pytest.mark.parametrize(
    ("response", "name"), [(RespType.BUSY, "BUSY"), (7, "7"), (-1, "-1"), (None, "None")]
)  # fmt: skip
def test_an_exchange_names_known_unknown_and_missing_responses(
    response: RespType | int | None, name: str
) -> None:
    ex = Exchange(ReqType.PLUG, 0x1000, 2, response, 0.0)
    assert ex.response_name == name
    assert str(ex) == f"PLUG addr=0x1000 nb_blocks=2 -> {name}"
