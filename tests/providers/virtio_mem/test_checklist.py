"""virtio-mem.md §1 device requirements (D-*), one test per applicable requirement."""

from __future__ import annotations

import struct

import pytest

from ramdiscard import faults
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.providers.virtio_mem import (
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    BlockState,
    ConfigSpace,
    FeatureError,
    Request,
    RequestType,
    Response,
    ResponseType,
)
from ramdiscard.units import MiB

from .conftest import ADDR, BS, Factory, RecordingListener

ACK, NACK, BUSY, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR


def raw(rtype: int, addr: int = 0, nb: int = 0, pad: bytes = bytes(6), pad2: bytes = bytes(6)) -> bytes:
    return struct.pack("<H", rtype) + pad + struct.pack("<QH", addr, nb) + pad2


def resp_type(data: bytes) -> ResponseType:
    return ResponseType(struct.unpack_from("<H", data)[0])


def cfg(dev) -> ConfigSpace:  # type: ignore[no-untyped-def]
    return ConfigSpace.unpack(dev.config_bytes())


# -- configuration (3.2) --------------------------------------------------------------


def test_D_CFG_1_requested_and_usable_may_change(make: Factory) -> None:
    dev = make.device(256 * MiB, requested_size=0)
    assert (cfg(dev).requested_size, cfg(dev).usable_region_size) == (0, 0)
    dev.requested_size = 32 * MiB
    assert cfg(dev).requested_size == 32 * MiB
    assert cfg(dev).usable_region_size == 256 * MiB  # requested + 256 MiB, capped at region


def test_D_CFG_2_fixed_fields_never_change(make: Factory) -> None:
    dev = make.device(64 * MiB, node=0)
    before = cfg(dev)
    dev.plug(ADDR, 4)
    dev.requested_size = 0
    dev.unplug_all()
    dev.device_reset()
    dev.system_reset()
    after = cfg(dev)
    fixed = ("block_size", "node_id", "addr", "region_size")
    assert [getattr(before, f) for f in fixed] == [getattr(after, f) for f in fixed]


def test_D_CFG_3_plugged_size_reflects_plugged_blocks(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 3)
    dev.plug(ADDR + 10 * BS, 2)
    dev.unplug(ADDR + BS, 1)
    assert cfg(dev).plugged_size == 4 * BS == dev.plugged_size
    assert dev.plugged_size == dev.count_populated(0, dev.region_size)


def test_D_CFG_4_usable_at_least_requested(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=0)
    for req in (2 * MiB, 512 * MiB, 1024 * MiB, 4 * MiB, 0):
        dev.requested_size = req
        assert dev.usable_region_size >= req
        dev.unplug_all()  # shrink allowed here, still >= requested
        assert dev.usable_region_size >= req


def test_usable_region_for_is_what_a_write_on_a_fresh_device_gives(make: Factory) -> None:
    for req in (0, 2 * MiB, 512 * MiB, 900 * MiB, 1024 * MiB):
        dev = make.device(1024 * MiB, requested_size=0)
        predicted = dev.usable_region_for(req)
        dev.requested_size = req  # grows the usable region from 0 to the rule's size
        assert dev.usable_region_size == predicted
        bs = dev.block_size
        rule = min(1024 * MiB, -(-(req + dev.usable_extent) // bs) * bs)
        assert predicted == (0 if req == 0 else rule)


def test_D_CFG_5_block_size_power_of_two(make: Factory) -> None:
    with pytest.raises(ValueError, match="power of two"):
        make.device(64 * MiB, block_size=3 * MiB)
    dev = make.device(64 * MiB, block_size=None)
    bs = cfg(dev).block_size
    assert bs & (bs - 1) == 0 and bs >= 1 * MiB


def test_D_CFG_6_fields_are_block_multiples(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=2 * MiB)
    c = cfg(dev)
    for v in (c.addr, c.region_size, c.usable_region_size, c.plugged_size, c.requested_size):
        assert v % c.block_size == 0
    with pytest.raises(ValueError, match="requested-size must be a multiple of block-size"):
        dev.requested_size = 3 * MiB
    with pytest.raises(ValueError, match="addr must be a multiple"):
        make.device(64 * MiB, addr=ADDR + MiB)
    with pytest.raises(ValueError, match="backend size must be a multiple"):
        make.device(65 * MiB)


@pytest.mark.parametrize("size", [2 * MiB, 64 * MiB, 4096 * MiB])
def test_D_CFG_7_region_size_is_the_backend_size(make: Factory, size: int) -> None:
    """region_size is an unsigned field: "0 or greater" is only testable as the value the
    driver decodes, which must be the backend's size, also above 32 bits."""
    raw_cfg = make.device(size, requested_size=0).config_bytes()
    assert struct.unpack_from("<Q", raw_cfg, 24)[0] == size


def test_D_CFG_8_usable_shrinks_only_on_unplug_all_or_reset(make: Factory) -> None:
    dev = make.device(2048 * MiB, requested_size=1024 * MiB)
    usable = dev.usable_region_size
    assert usable == 1280 * MiB
    dev.requested_size = 2 * MiB
    assert dev.usable_region_size == usable  # never shrinks on a requested-size change
    dev.plug(ADDR, 1)
    dev.unplug(ADDR, 1)
    assert dev.usable_region_size == usable
    assert dev.unplug_all() is ACK
    assert dev.usable_region_size == 258 * MiB
    dev.requested_size = 1024 * MiB
    dev.requested_size = 0
    dev.system_reset()
    assert dev.usable_region_size == 0


def test_D_CFG_9_config_notification_on_requested_and_usable_change(make: Factory) -> None:
    seen: list[int] = []
    dev = make.device(1024 * MiB, requested_size=0, on_config_change=lambda d: seen.append(d.requested_size))
    dev.requested_size = 64 * MiB  # grows usable
    assert seen == [64 * MiB]
    dev.requested_size = 2 * MiB
    assert seen == [64 * MiB, 2 * MiB]
    dev.unplug_all()  # shrinks usable: no notification for UNPLUG ALL
    assert len(seen) == 2


def test_D_CFG_10_no_config_notification_for_plugged_size(make: Factory) -> None:
    seen: list[object] = []
    sizes: list[int] = []
    dev = make.device(on_config_change=seen.append, on_size_change=lambda _id, s: sizes.append(s))
    dev.plug(ADDR, 2)
    dev.unplug(ADDR, 1)
    dev.unplug_all()
    assert seen == []
    assert sizes == [2 * BS, BS, 0]


def test_D_CFG_11_config_notification_even_if_unchanged(make: Factory) -> None:
    seen: list[object] = []
    dev = make.device(requested_size=8 * MiB, on_config_change=seen.append)
    dev.requested_size = 8 * MiB
    assert len(seen) == 1


# -- initialization (3.4) ----------------------------------------------------------------


def test_D_INIT_1_refuses_driver_without_unplugged_inaccessible(make: Factory) -> None:
    dev = make.device()
    ui = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
    assert dev.host_features & ui
    with pytest.raises(FeatureError, match="UNPLUGGED_INACCESSIBLE"):
        dev.set_driver_features(0)
    assert dev.driver_features == 0
    dev.set_driver_features(ui)
    assert dev.driver_features == ui
    with pytest.raises(FeatureError, match="not offered"):
        dev.set_driver_features(ui | (1 << VIRTIO_MEM_F_ACPI_PXM))
    off = make.device(unplugged_inaccessible=False)
    off.set_driver_features(0)


def test_D_INIT_2_device_reset_keeps_block_state(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 5)
    bitmap = dev.bitmap_bytes()
    dev.device_reset()
    assert dev.bitmap_bytes() == bitmap and dev.plugged_size == 5 * BS


def test_D_INIT_3_device_reset_keeps_plugged_memory(make: Factory, backing: str) -> None:
    dev = make.device(backing=backing)
    dev.plug(ADDR, 2)
    ram = dev.ram
    calls_before = (list(getattr(ram, "discards", [])), list(getattr(ram, "populates", [])))
    if backing != "fake":
        ram.view[0:4] = b"keep"
    dev.device_reset()
    if backing == "fake":
        assert (ram.discards, ram.populates) == calls_before
    else:
        assert bytes(ram.view[0:4]) == b"keep"
        assert ram.resident_bytes(0, BS) > 0


def test_D_INIT_4_persistent_suspend_offered_when_supported(make: Factory) -> None:
    ps = 1 << VIRTIO_MEM_F_PERSISTENT_SUSPEND
    assert not make.device().host_features & ps
    assert make.device(persistent_suspend=True).host_features & ps


# -- operation (3.5) --------------------------------------------------------------------


def test_D_OP_1_plugged_memory_is_plain_ram(make: Factory, real_backing: str) -> None:
    """A plugged block is guest RAM like a plain RAM block of the same backing: mapped at
    its address as RAM, reported populated, zero-filled, and it keeps what the guest wrote
    while other blocks are plugged, unplugged, queried and the device is reset."""
    dev = make.device(backing=real_backing)
    plain = make.ram(dev.region_size, real_backing)
    _root, space = make.map(dev)
    assert dev.plug(ADDR + BS, 1) is ACK
    (sec,) = [s for s in space.flatview() if s.offset_within_address_space <= ADDR + BS < s.address_end]
    assert sec.mr is dev.region and sec.mr.is_ram and not sec.readonly
    assert sec.offset_within_region + (ADDR + BS - sec.offset_within_address_space) == BS
    assert dev.is_populated(MemoryRegionSection(dev.region, BS, BS))
    ram = dev.ram
    assert bytes(ram.view[BS : 2 * BS]) == bytes(plain.view[BS : 2 * BS]) == bytes(BS)
    pattern = bytes(range(256)) * (BS // 256)
    ram.view[BS : 2 * BS] = pattern
    plain.view[BS : 2 * BS] = pattern
    assert ram.resident_bytes(BS, BS) == plain.resident_bytes(BS, BS) == BS
    assert dev.plug(ADDR, 1) is ACK and dev.plug(ADDR + 2 * BS, 1) is ACK
    assert dev.unplug(ADDR, 1) is ACK and dev.unplug(ADDR + 2 * BS, 1) is ACK
    assert dev.state(ADDR + BS, 1) == (ACK, BlockState.PLUGGED)
    dev.device_reset()
    assert bytes(ram.view[BS : 2 * BS]) == pattern
    assert ram.resident_bytes(BS, BS) == BS


def test_D_OP_2_unplugged_memory_is_discarded(make: Factory, real_backing: str) -> None:
    dev = make.device(backing=real_backing)
    dev.plug(ADDR, 1)
    ram = dev.ram
    ram.populate(0, BS)
    ram.view[0:4] = b"data"
    assert dev.unplug(ADDR, 1) is ACK
    assert ram.resident_bytes(0, BS) == 0
    assert bytes(ram.view[0:4]) == bytes(4)


def test_D_OP_3_other_requests_do_not_touch_plugged_blocks(make: Factory, real_backing: str) -> None:
    dev = make.device(backing=real_backing)
    dev.plug(ADDR, 2)
    ram = dev.ram
    ram.view[0:4] = b"mine"
    dev.plug(ADDR + 4 * BS, 2)
    dev.unplug(ADDR + 4 * BS, 2)
    dev.unplug(ADDR + BS, 1)
    dev.state(ADDR, 3)
    assert bytes(ram.view[0:4]) == b"mine"


def test_D_OP_4_driver_may_use_plugged_blocks(make: Factory, real_backing: str) -> None:
    dev = make.device(backing=real_backing, prealloc=True)
    dev.plug(ADDR, 1)
    assert dev.ram.resident_bytes(0, BS) == BS
    dev.ram.view[BS - 1] = 0x5A
    assert dev.ram.view[BS - 1] == 0x5A


def test_D_OP_5_unplugged_readable_without_unplugged_inaccessible(make: Factory, real_backing: str) -> None:
    """Without UNPLUGGED_INACCESSIBLE the device neither offers nor requires it, and an
    unplugged block inside the usable region stays mapped and readable (as zeroes)."""
    dev = make.device(backing=real_backing, unplugged_inaccessible=False)
    assert not dev.host_features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    dev.set_driver_features(0)
    _root, space = make.map(dev)
    assert dev.plug(ADDR + 3 * BS, 1) is ACK
    dev.ram.view[3 * BS : 3 * BS + 4] = b"gone"
    assert dev.unplug(ADDR + 3 * BS, 1) is ACK
    assert dev.usable_region_size >= 4 * BS
    (sec,) = [s for s in space.flatview() if s.offset_within_address_space <= ADDR + 3 * BS < s.address_end]
    assert sec.mr is dev.region
    assert bytes(dev.ram.view[3 * BS : 4 * BS]) == bytes(BS)


def test_D_OP_6_D_OP_7_system_reset_unplugs_everything(make: Factory) -> None:
    rdl = RecordingListener()
    dev = make.device(1024 * MiB, requested_size=512 * MiB)
    dev.register_listener(rdl, _whole(dev))
    assert dev.usable_region_size == 768 * MiB
    assert dev.plug(ADDR, 4) is ACK
    dev.requested_size = 8 * MiB
    assert dev.usable_region_size == 768 * MiB
    dev.system_reset()
    assert dev.plugged_size == 0 and dev.bitmap_bytes() == bytes(len(dev.bitmap_bytes()))
    assert rdl.populated == set()
    assert dev.usable_region_size == 8 * MiB + 256 * MiB  # shrunk to fit requested_size


def test_D_OP_7_system_reset_busy_is_ignored(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 1)
    dev.set_busy_predicate(lambda: True)
    dev.system_reset()  # no exception: QEMU ignores the BUSY result
    assert dev.plugged_size == BS
    dev.set_busy_predicate(None)
    assert dev.unplug_all() is ACK


def test_D_OP_8_wakeup_reset_keeps_state(make: Factory) -> None:
    dev = make.device(persistent_suspend=True)
    dev.plug(ADDR, 3)
    dev.system_reset(wakeup=True)
    assert dev.plugged_size == 3 * BS


# -- PLUG (3.6) ----------------------------------------------------------------------


def test_D_PLUG_1_D_PLUG_2_padding_ignored(make: Factory) -> None:
    dev = make.device()
    r = dev.handle_request(raw(0, ADDR, 2, pad=b"\xff" * 6, pad2=b"\xee" * 6) + b"trailing junk")
    assert resp_type(r) is ACK and dev.plugged_size == 2 * BS


def test_D_PLUG_3_unaligned_addr_is_error(make: Factory) -> None:
    dev = make.device()
    assert dev.plug(ADDR + 4096, 1) is ERROR


def test_D_PLUG_4_zero_blocks_is_error(make: Factory) -> None:
    assert make.device().plug(ADDR, 0) is ERROR


def test_D_PLUG_5_outside_usable_region_is_error(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=2 * MiB)
    usable_end = ADDR + dev.usable_region_size
    assert dev.plug(usable_end, 1) is ERROR
    assert dev.plug(usable_end - BS, 2) is ERROR
    assert dev.plug(ADDR - BS, 1) is ERROR
    assert dev.plug(0, 1) is ERROR
    assert dev.plug((1 << 64) - BS, 2) is ERROR  # overflow


def test_D_PLUG_6_already_plugged_is_error(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR + 2 * BS, 1)
    assert dev.plug(ADDR, 3) is ERROR
    assert dev.plugged_size == BS


def test_D_PLUG_7_busy(make: Factory) -> None:
    dev = make.device(busy=lambda: True)
    assert dev.plug(ADDR, 1) is BUSY and dev.plugged_size == 0
    with faults.inject("populate"):
        pre = make.device(prealloc=True)
        assert pre.plug(ADDR, 1) is BUSY
    assert pre.plugged_size == 0 and pre.metrics.host_failures == 1


def test_D_PLUG_8_ack_when_plugged(make: Factory) -> None:
    dev = make.device()
    assert dev.plug(ADDR, 2) is ACK
    assert dev.state(ADDR, 2) == (ACK, BlockState.PLUGGED)


def test_D_PLUG_9_plugged_size_updated(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 7)
    assert cfg(dev).plugged_size == 7 * BS


def test_plug_beyond_requested_is_nack_after_range_check(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=4 * MiB)
    assert dev.plug(ADDR, 3) is NACK
    assert dev.plug(ADDR + 1, 3) is ERROR  # validity first
    assert dev.plug(ADDR, 2) is ACK
    assert dev.plug(ADDR + 2 * BS, 1) is NACK


# -- UNPLUG (3.7) ------------------------------------------------------------------


def test_D_UNPLUG_1_D_UNPLUG_2_padding_ignored(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    assert resp_type(dev.handle_request(raw(1, ADDR, 2, pad=b"\x01" * 6, pad2=b"\x02" * 6))) is ACK


def test_D_UNPLUG_3_unaligned_addr_is_error(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    assert dev.unplug(ADDR + 512, 1) is ERROR


def test_D_UNPLUG_4_zero_blocks_is_error(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    assert dev.unplug(ADDR, 0) is ERROR


def test_D_UNPLUG_5_outside_usable_region_is_error(make: Factory) -> None:
    dev = make.device()
    assert dev.unplug(ADDR + dev.usable_region_size, 1) is ERROR
    assert dev.unplug(ADDR - BS, 1) is ERROR


def test_D_UNPLUG_6_already_unplugged_is_error(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    assert dev.unplug(ADDR, 3) is ERROR
    assert dev.plugged_size == 2 * BS


def test_D_UNPLUG_7_busy(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    dev.set_busy_predicate(lambda: True)
    assert dev.unplug(ADDR, 1) is BUSY
    dev.set_busy_predicate(None)
    with faults.inject("discard"):
        assert dev.unplug(ADDR, 1) is BUSY
    assert dev.plugged_size == 2 * BS and dev.state(ADDR, 2)[1] is BlockState.PLUGGED


def test_D_UNPLUG_8_D_UNPLUG_9_ack_and_size(make: Factory) -> None:
    dev = make.device(requested_size=4 * MiB)
    dev.plug(ADDR, 2)
    dev.requested_size = 0
    assert dev.unplug(ADDR, 1) is ACK  # allowed below requested_size
    assert cfg(dev).plugged_size == BS


# -- UNPLUG ALL (3.8) --------------------------------------------------------------------


def test_D_UA_1_D_UA_2_request_data_ignored(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    assert resp_type(dev.handle_request(raw(2, 0xDEAD, 77, pad=b"\x09" * 6))) is ACK
    assert dev.plugged_size == 0


def test_D_UA_3_busy(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    dev.set_busy_predicate(lambda: True)
    assert dev.unplug_all() is BUSY
    dev.set_busy_predicate(None)
    with faults.inject("discard"):
        assert dev.unplug_all() is BUSY
    assert dev.plugged_size == 2 * BS


def test_D_UA_4_D_UA_5_ack_and_zero(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 2)
    dev.plug(ADDR + 8 * BS, 2)
    assert dev.unplug_all() is ACK
    assert cfg(dev).plugged_size == 0
    assert dev.unplug_all() is ACK  # also with nothing plugged


def test_D_UA_6_usable_may_shrink(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=512 * MiB)
    dev.requested_size = 2 * MiB
    assert dev.usable_region_size == 768 * MiB
    assert dev.unplug_all() is ACK
    assert dev.usable_region_size == 258 * MiB


# -- STATE (3.9) ---------------------------------------------------------------------


def test_D_ST_1_D_ST_2_padding_ignored(make: Factory) -> None:
    dev = make.device()
    r = Response.parse(
        dev.handle_request(raw(3, ADDR, 1, pad=b"\x07" * 6, pad2=b"\x07" * 6)), request=RequestType.STATE
    )
    assert r == Response(ACK, BlockState.UNPLUGGED)


def test_D_ST_3_unaligned_is_error(make: Factory) -> None:
    assert make.device().state(ADDR + 1, 1) == (ERROR, None)


def test_D_ST_4_zero_blocks_is_error(make: Factory) -> None:
    assert make.device().state(ADDR, 0) == (ERROR, None)


def test_D_ST_5_outside_usable_is_error(make: Factory) -> None:
    dev = make.device()
    assert dev.state(ADDR + dev.usable_region_size, 1) == (ERROR, None)
    data = dev.handle_request(Request(RequestType.STATE, ADDR - BS, 1).pack())
    assert data == Response(ERROR).pack()  # no state filled in for an error


def test_D_ST_6_to_9_states(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR + BS, 2)
    assert dev.state(ADDR + BS, 2) == (ACK, BlockState.PLUGGED)
    assert dev.state(ADDR + 3 * BS, 4) == (ACK, BlockState.UNPLUGGED)
    assert dev.state(ADDR, 2) == (ACK, BlockState.MIXED)
    dev.set_busy_predicate(lambda: True)
    assert dev.state(ADDR, 4) == (ACK, BlockState.MIXED)  # STATE is served while busy


# -- edge cases (3.10) ------------------------------------------------------------------


def test_edge_nb_blocks_is_16_bit(make: Factory) -> None:
    with pytest.raises(ValueError):
        Request(RequestType.PLUG, ADDR, 1 << 16)
    dev = make.device()
    assert dev.plug(ADDR, 0xFFFF) is ERROR  # 128 GiB: outside the usable region


def test_edge_malformed_is_only_error_never_nack_or_busy(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=0, busy=lambda: True)
    for addr, nb in ((ADDR + 1, 1), (ADDR, 0), (ADDR - BS, 1), ((1 << 64) - BS, 1)):
        assert dev.plug(addr, nb) is ERROR
        assert dev.unplug(addr, nb) is ERROR


def _whole(dev):  # type: ignore[no-untyped-def]
    from ramdiscard.memory import MemoryRegionSection

    return MemoryRegionSection(dev.region, 0, dev.region_size, dev.addr)
