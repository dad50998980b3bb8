"""Peer deviations (peers.md §1, virtio-mem.md §3.11) that must not occur here, and
dynamic memslots (qemu-ram-discard §3.9, §5.2)."""

from __future__ import annotations

import pytest

from ramdiscard import faults
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.providers.virtio_mem import BlockState, ProtocolError, ResponseType
from ramdiscard.units import GiB, MiB

from .conftest import ADDR, BS, Factory, RecordingListener, VfioLikeListener

ACK, NACK, BUSY, ERROR = ResponseType.ACK, ResponseType.NACK, ResponseType.BUSY, ResponseType.ERROR


def test_peer_fc_unplug_all_keeps_usable_at_least_requested(make: Factory) -> None:
    dev = make.device(1024 * MiB, requested_size=64 * MiB)
    dev.plug(ADDR, 4)
    assert dev.unplug_all() is ACK
    assert dev.usable_region_size >= dev.requested_size > 0


def test_peer_fc_plug_beyond_requested_is_nack_not_error(make: Factory) -> None:
    dev = make.device(requested_size=2 * MiB)
    assert dev.plug(ADDR, 2) is NACK


def test_peer_ch_nack_only_after_range_validity(make: Factory) -> None:
    dev = make.device(requested_size=0)
    assert dev.plug(ADDR + 4096, 1) is ERROR


def test_peer_fc_ch_unknown_type_is_device_error_not_response(make: Factory) -> None:
    dev = make.device()
    with pytest.raises(ProtocolError):
        dev.handle_request(b"\x07\x00" + bytes(22))  # CH answers ERROR, FC never answers


def test_peer_dragonball_state_error_has_no_state(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 1)
    assert dev.state(ADDR - BS, 2) == (ERROR, None)
    assert dev.handle_request(bytes(2) + bytes(22))[8:10] == b"\x00\x00"


def test_peer_ch_listener_failure_leaves_no_drift(make: Factory) -> None:
    dev = make.device()
    rdl = RecordingListener(refuse=lambda s: True)
    dev.register_listener(rdl, MemoryRegionSection(dev.region, 0, dev.region_size))
    assert dev.plug(ADDR, 2) is BUSY
    assert dev.plugged_size == 0 and dev.state(ADDR, 2) == (ACK, BlockState.UNPLUGGED)
    dev.unregister_listener(rdl)


def test_peer_fc_discard_failure_is_busy_not_ack(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 1)
    with faults.inject("discard"):
        assert dev.unplug(ADDR, 1) is BUSY  # FC logs and ACKs, CH answers ERROR
    assert dev.plugged_size == BS


def test_peer_ch_fc_busy_during_migration(make: Factory) -> None:
    migrating = [True]
    dev = make.device(busy=lambda: migrating[0])
    assert dev.plug(ADDR, 1) is BUSY  # CH/FC never answer BUSY
    migrating[0] = False
    assert dev.plug(ADDR, 1) is ACK


def test_peer_ch_dragonball_refuse_driver_without_unplugged_inaccessible(make: Factory) -> None:
    from ramdiscard.providers.virtio_mem import FeatureError

    with pytest.raises(FeatureError):
        make.device().set_driver_features(0)


def test_peer_fc_unplug_order_discard_before_bitmap_clear(make: Factory) -> None:
    dev = make.device()
    dev.plug(ADDR, 1)
    seen: list[bool] = []
    dev.add_host_discard_hook(lambda off, size: seen.append(dev.is_range_populated(off, size)))
    dev.unplug(ADDR, 1)
    assert seen == [True]  # bits cleared only after the host discard


def test_peer_block_size_configurable(make: Factory) -> None:
    assert make.device(64 * MiB, block_size=4 * MiB).block_size == 4 * MiB  # CH/Dragonball: fixed


def test_peer_ch_dragonball_usable_region_not_whole_region(make: Factory) -> None:
    assert make.device(4 * GiB, requested_size=GiB).usable_region_size == GiB + 256 * MiB


# -- dynamic memslots ---------------------------------------------------------------------


def test_memslots_follow_plugging(make: Factory) -> None:
    dev = make.device(4 * GiB, requested_size=4 * GiB, dynamic_memslots=True, memslot_limit=4)
    assert (dev.nb_memslots, dev.memslot_size, dev.mapped_memslots) == (4, GiB, 0)
    assert dev.device_region is not dev.region and dev.device_region.size == 4 * GiB
    dev.plug(ADDR, 1)
    assert dev.mapped_memslots == 1
    dev.plug(ADDR + GiB - BS, 2)  # straddles memslots 0 and 1
    assert dev.mapped_memslots == 2
    dev.unplug(ADDR, 1)
    assert dev.mapped_memslots == 2
    dev.unplug(ADDR + GiB - BS, 1)
    assert dev.mapped_memslots == 1
    dev.plug(ADDR + 3 * GiB, 1)
    assert dev.unplug_all() is ACK and dev.mapped_memslots == 0


def test_memslots_listener_one_section_per_memslot_no_double_populate(make: Factory) -> None:
    dev = make.device(4 * GiB, requested_size=4 * GiB, dynamic_memslots=True, memslot_limit=4)
    _root, space = make.map(dev)
    vfio = VfioLikeListener()  # strict RDM listeners: duplicate populate asserts
    space.register_listener(vfio)
    assert vfio.rdls == {}
    assert dev.plug(ADDR + GiB - 2 * BS, 4) is ACK  # maps memslots 0 and 1 during the plug
    sections = sorted(s.offset_within_region for s in vfio.rdls)
    assert sections == [0, GiB]
    assert [
        s.offset_within_address_space for s in sorted(vfio.rdls, key=lambda s: s.offset_within_region)
    ] == [
        ADDR,
        ADDR + GiB,
    ]
    populated = sorted(e for e in vfio.all_events if e[0] == "populate")
    assert populated == [("populate", GiB - 2 * BS, 2 * BS), ("populate", GiB, 2 * BS)]
    for rdl in vfio.rdls.values():
        assert rdl.populated
    dev.plug(ADDR + 2 * BS, 1)  # memslot 0 already mapped: regular populate
    assert dev.unplug(ADDR + GiB, 2) is ACK
    assert dev.mapped_memslots == 1 and len(vfio.rdls) == 1
    assert dev.unplug_all() is ACK and vfio.rdls == {}


def test_memslots_listener_refusal_unmaps_new_memslots(make: Factory) -> None:
    dev = make.device(2 * GiB, requested_size=2 * GiB, dynamic_memslots=True)
    _root, space = make.map(dev)
    vfio = VfioLikeListener()
    space.register_listener(vfio)
    dev.plug(ADDR, 1)
    blocker = RecordingListener(refuse=lambda s: s.offset_within_region >= GiB)
    dev.register_listener(blocker, MemoryRegionSection(dev.region, 0, dev.region_size))
    assert dev.plug(ADDR + GiB, 1) is BUSY
    assert dev.mapped_memslots == 1 and len(vfio.rdls) == 1
    dev.unregister_listener(blocker)


def test_memslots_off_device_region_is_ram(make: Factory) -> None:
    dev = make.device()
    assert dev.device_region is dev.region and dev.mapped_memslots == 0 and dev.nb_memslots == 1
