"""Wire formats, realize/unrealize rules, protocol errors, listeners and rollback."""

from __future__ import annotations

import pytest

from ramdiscard import faults
from ramdiscard.errors import DiscardPolicyError, ListenerError, RegionMapped
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import (
    CONFIG_SIZE,
    BlockState,
    ConfigSpace,
    DeviceBroken,
    ProtocolError,
    Request,
    RequestType,
    Response,
    ResponseType,
    VirtioMem,
    default_block_size,
    memslot_geometry,
)
from ramdiscard.providers.virtio_mem.wire import parse_request
from ramdiscard.rdm import AggregateManager, BlockStateManager, RamDiscardManager
from ramdiscard.units import GiB, MiB

from .conftest import ADDR, BS, Factory, FakeRam, RecordingListener

ACK, BUSY = ResponseType.ACK, ResponseType.BUSY


def whole(dev: VirtioMem) -> MemoryRegionSection:
    return MemoryRegionSection(dev.region, 0, dev.region_size, dev.addr)


# -- wire -----------------------------------------------------------------------------


def test_wire_layouts_round_trip() -> None:
    req = Request(RequestType.STATE, 0x1_0020_0000, 513)
    data = req.pack()
    assert len(data) == 24 and data[:2] == b"\x03\x00" and data[8:16] == (0x1_0020_0000).to_bytes(8, "little")
    assert Request.parse(data) == req
    resp = Response(ResponseType.ACK, BlockState.MIXED)
    assert resp.pack() == b"\x00\x00" + bytes(6) + b"\x02\x00"
    assert Response.parse(resp.pack(), request=RequestType.STATE) == resp
    assert Response.parse(resp.pack()) == Response(ResponseType.ACK)
    c = ConfigSpace(2 * MiB, 3, ADDR, GiB, 512 * MiB, 4 * MiB, 256 * MiB)
    packed = c.pack()
    assert len(packed) == CONFIG_SIZE == 56 and packed[8:10] == b"\x03\x00" and packed[10:16] == bytes(6)
    assert ConfigSpace.unpack(packed) == c
    assert Request.parse(Request(RequestType.UNPLUG_ALL).pack()[:2] + b"\xff" * 22) == Request(
        RequestType.UNPLUG_ALL
    )


def test_wire_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="too short"):
        Request.parse(bytes(23))
    with pytest.raises(ProtocolError, match="unknown request type 4"):
        Request.parse(b"\x04" + bytes(23))


def test_parse_request_gives_the_fields_of_request_parse() -> None:
    for req in (
        Request(RequestType.PLUG, ADDR, 7),
        Request(RequestType.UNPLUG, (1 << 64) - BS, 0xFFFF),
        Request(RequestType.STATE, 0, 0),
    ):
        assert parse_request(req.pack() + b"trailing") == (req.type, req.addr, req.nb_blocks)
        assert Request.parse(req.pack()) == req
    # UNPLUG_ALL ignores the address and count fields, in both forms.
    data = Request(RequestType.UNPLUG_ALL).pack()[:2] + b"\xff" * 22
    assert parse_request(data) == (RequestType.UNPLUG_ALL, 0, 0)
    for bad, why in ((bytes(23), "too short"), (b"\x04" + bytes(23), "unknown request type 4")):
        with pytest.raises(ProtocolError, match=why):
            parse_request(bad)


# -- realize --------------------------------------------------------------------------


def test_is_a_ram_discard_manager_and_set_on_region(make: Factory) -> None:
    dev = make.device()
    assert isinstance(dev, RamDiscardManager) and isinstance(dev, BlockStateManager)
    assert dev.region.ram_discard_manager is dev
    assert dev.get_min_granularity(dev.region) == BS


def test_realize_discards_whole_block_and_starts_unplugged(make: Factory) -> None:
    dev = make.device(64 * MiB)
    assert dev.ram.discards == [(0, 64 * MiB)]
    assert dev.plugged_size == 0 and dev.bitmap_bytes() == bytes(4)
    assert dev.realize_discarded
    incoming = make.device(64 * MiB, incoming=True)
    assert incoming.ram.discards == [] and not incoming.realize_discarded


def test_default_block_size_is_thp_or_page(make: Factory) -> None:
    assert default_block_size(4096) >= 1 * MiB
    assert default_block_size(1 * GiB) == 1 * GiB  # hugetlb page size wins
    dev = make.device(64 * MiB, block_size=None)
    assert dev.block_size == default_block_size(4096)


def test_block_size_rules(make: Factory) -> None:
    with pytest.raises(ValueError, match="at least 1 MiB"):
        make.device(64 * MiB, block_size=512 * 1024)
    mr = MemoryRegion.new_ram("huge", FakeRam(4 * GiB, page_size=1 * GiB))
    with pytest.raises(ValueError, match="page size"):
        VirtioMem(mr, addr=ADDR, block_size=2 * MiB, policy=make.policy)
    assert mr.ram_discard_manager is None


def test_realize_requested_size_checks(make: Factory) -> None:
    with pytest.raises(ValueError, match="requested-size must be a multiple of block-size"):
        make.device(64 * MiB, requested_size=MiB)
    with pytest.raises(ValueError, match="cannot exceed the memory backend size"):
        make.device(64 * MiB, requested_size=128 * MiB)


def test_usable_region_policy(make: Factory) -> None:
    assert make.device(4 * GiB, requested_size=0).usable_region_size == 0
    assert make.device(4 * GiB, requested_size=GiB).usable_region_size == GiB + 256 * MiB
    assert make.device(512 * MiB, requested_size=300 * MiB).usable_region_size == 512 * MiB


def test_realize_policy_conflict_holds_nothing(make: Factory) -> None:
    make.policy.disable(True)
    ram = FakeRam(64 * MiB)
    mr = MemoryRegion.new_ram("r", ram)
    with pytest.raises(DiscardPolicyError, match="Discarding RAM is disabled"):
        VirtioMem(mr, addr=ADDR, block_size=BS, policy=make.policy)
    assert mr.ram_discard_manager is None and make.policy.snapshot().coordinated_require == 0
    assert ram.discards == []
    make.policy.disable(False)


def test_realize_discard_failure_holds_nothing(make: Factory) -> None:
    mr = MemoryRegion.new_ram("r", FakeRam(64 * MiB))
    with faults.inject("discard"), pytest.raises(OSError):
        VirtioMem(mr, addr=ADDR, block_size=BS, policy=make.policy)
    assert mr.ram_discard_manager is None and make.policy.snapshot().coordinated_require == 0


def test_realize_busy_memdev(make: Factory) -> None:
    dev = make.device()
    with pytest.raises(ValueError, match="busy"):
        VirtioMem(dev.region, addr=ADDR, block_size=BS, policy=make.policy)
    assert make.policy.snapshot().coordinated_require == 1
    # Another kind of provider on the region is not a busy memdev: both become sources
    # of one aggregate manager, and unrealize hands the region back to the other one.
    other = MemoryRegion.new_ram("other", FakeRam(64 * MiB))
    rival = BlockStateManager(other, BS)
    other.set_ram_discard_manager(rival)
    joined = VirtioMem(other, addr=ADDR, block_size=BS, policy=make.policy)
    agg = other.ram_discard_manager
    assert isinstance(agg, AggregateManager) and agg.sources == (rival, joined)
    with pytest.raises(ValueError, match="busy"):
        VirtioMem(other, addr=ADDR, block_size=BS, policy=make.policy)
    joined.unrealize()
    assert other.ram_discard_manager is rival and make.policy.snapshot().coordinated_require == 1


def test_realize_node_and_dynamic_memslot_rules(make: Factory) -> None:
    with pytest.raises(ValueError, match="NUMA"):
        make.device(node=1)
    dev = make.device(node=1, numa_nodes=2)
    assert dev.host_features & 1 and dev.config().node_id == 1
    with pytest.raises(ValueError, match="unplugged-inaccessible"):
        make.device(dynamic_memslots=True, unplugged_inaccessible=False)


def test_unrealize_releases_everything(make: Factory) -> None:
    dev = make.device()
    root, _space = make.map(dev)
    with pytest.raises(RegionMapped):
        dev.unrealize()
    assert dev.region.ram_discard_manager is dev
    root.del_subregion(dev.device_region)
    rdl = RecordingListener()
    dev.register_listener(rdl, whole(dev))
    with pytest.raises(ListenerError):
        dev.unrealize()
    dev.unregister_listener(rdl)
    dev.unrealize()
    dev.unrealize()  # idempotent
    assert dev.region.ram_discard_manager is None and make.policy.snapshot().coordinated_require == 0
    with pytest.raises(Exception, match="unrealized"):
        dev.plug(ADDR, 1)


def test_unplug_check_preconditions(make: Factory) -> None:
    dev = make.device(requested_size=4 * MiB)
    with pytest.raises(ValueError, match="requested-size"):
        dev.unplug_check()
    dev.requested_size = 0
    dev.unplug_check()


# -- protocol errors ------------------------------------------------------------------


def test_protocol_violation_breaks_device_until_reset(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 1)
    with pytest.raises(ProtocolError):
        dev.handle_request(bytes(10))
    assert dev.broken
    with pytest.raises(DeviceBroken):
        dev.handle_request(Request(RequestType.STATE, ADDR, 1).pack())
    with pytest.raises(DeviceBroken):
        dev.plug(ADDR + BS, 1)
    assert dev.plugged_size == BS
    dev.device_reset()
    assert dev.plug(ADDR + BS, 1) is ACK
    with pytest.raises(ProtocolError, match="unknown request type"):
        dev.handle_request(b"\x09\x00" + bytes(22))
    dev.system_reset()
    assert not dev.broken and dev.plugged_size == 0
    m = dev.metrics.as_dict()
    assert m["protocol_errors"] == 2 and m["broken_refusals"] == 2


def test_metrics(make: Factory) -> None:
    dev = make.device(requested_size=4 * MiB)
    dev.plug(ADDR, 2)
    dev.plug(ADDR + 2 * BS, 1)  # NACK
    dev.unplug(ADDR, 1)
    dev.state(ADDR, 1)
    dev.unplug_all()
    m = dev.metrics.as_dict()
    assert m["requests"] == {"plug": 2, "unplug": 1, "unplug_all": 1, "state": 1}
    assert m["responses"] == {"ack": 4, "nack": 1, "busy": 0, "error": 0}
    assert m["plugged_bytes"] == 2 * BS and m["unplugged_bytes"] == 2 * BS


# -- listeners ---------------------------------------------------------------------------


def test_listener_sees_populate_before_and_discard_after(make: Factory) -> None:
    dev = make.device()
    order: list[str] = []

    class L(RecordingListener):
        def notify_populate(self, section: MemoryRegionSection) -> None:
            order.append(f"populate plugged={dev.is_range_populated(section.offset_within_region, BS)}")
            super().notify_populate(section)

        def notify_discard(self, section: MemoryRegionSection) -> None:
            order.append(f"discard host={len(dev.ram.discards)}")
            super().notify_discard(section)

    dev.register_listener(L(), whole(dev))
    dev.plug(ADDR, 1)
    dev.unplug(ADDR, 1)
    assert order == ["populate plugged=False", "discard host=2"]  # realize discard + unplug discard
    for rdl in dev.listeners:
        dev.unregister_listener(rdl)


def test_listener_refusal_rolls_back_and_answers_busy(make: Factory) -> None:
    dev = make.device()
    first = RecordingListener()
    refusing = RecordingListener(refuse=lambda s: s.offset_within_region >= 4 * BS)
    last = RecordingListener()
    dev.register_listener(first, whole(dev))
    dev.register_listener(refusing, MemoryRegionSection(dev.region, 2 * BS, 8 * BS, ADDR + 2 * BS))
    dev.register_listener(last, whole(dev))  # head of the list: notified first
    dev.plug(ADDR, 2)
    discards = len(dev.ram.discards)
    assert dev.plug(ADDR + 4 * BS, 2) is BUSY
    assert dev.plugged_size == 2 * BS
    assert last.populated == {0, 1} and first.populated == {0, 1} and refusing.populated == set()
    assert dev.ram.discards[discards:] == [(4 * BS, 2 * BS)]  # memory re-discarded
    assert dev.metrics.listener_refusals == 1
    for rdl in dev.listeners:
        dev.unregister_listener(rdl)


def test_is_populated_virtio_mem_semantics(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=2 * MiB)
    dev.plug(ADDR, 1)
    assert dev.is_populated(MemoryRegionSection(dev.region, 4096, 4096))
    assert not dev.is_populated(MemoryRegionSection(dev.region, 4096, 0))
    assert not dev.is_populated(MemoryRegionSection(dev.region, BS - 4096, 8192))
    assert not dev.is_populated(MemoryRegionSection(dev.region, 900 * MiB, BS))  # outside usable


def test_memslot_geometry_rules() -> None:
    assert memslot_geometry(4 * GiB, BS, None) == (GiB, 4)
    assert memslot_geometry(4 * GiB, BS, 1) == (4 * GiB, 1)
    assert memslot_geometry(4 * GiB, BS, 2) == (2 * GiB, 2)
    assert memslot_geometry(5 * GiB, BS, 100) == (GiB, 5)
    assert memslot_geometry(512 * MiB, BS, 8) == (512 * MiB, 1)
    assert memslot_geometry(3 * GiB, 2 * GiB, 8) == (2 * GiB, 2)  # last memslot smaller
