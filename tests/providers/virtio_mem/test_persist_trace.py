"""Device state save/load (qemu-ram-discard §3.10) and QEMU trace parsing/replay."""

from __future__ import annotations

import pytest

from ramdiscard import faults
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType, StateError, decode_state, encode_state
from ramdiscard.replay.events import (
    DiscardRange,
    PlugRequest,
    ResizedUsableRegion,
    SendResponse,
    TraceParseError,
    parse_trace,
    parse_trace_file,
)
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import GiB, MiB
from tests.conftest import sample_trace

from .conftest import ADDR, BS, Factory, RecordingListener, VfioLikeListener


def whole(dev) -> MemoryRegionSection:  # type: ignore[no-untyped-def]
    return MemoryRegionSection(dev.region, 0, dev.region_size, dev.addr)


def _source(make: Factory, **kw):  # type: ignore[no-untyped-def]
    src = make.device(256 * MiB, requested_size=64 * MiB, **kw)
    src.plug(ADDR, 3)
    src.plug(ADDR + 10 * BS, 5)
    return src


def test_save_load_round_trip_replays_to_listeners(make: Factory, backing: str) -> None:
    src = _source(make)
    data = src.save_state()
    dst = make.device(256 * MiB, requested_size=0, backing=backing)
    rdl = RecordingListener()
    dst.register_listener(rdl, whole(dst))
    sizes: list[int] = []
    dst.add_size_change_notifier(lambda _id, s: sizes.append(s))
    dst.load_state(data)
    assert dst.bitmap_bytes() == src.bitmap_bytes() and dst.plugged_size == 8 * BS
    assert (dst.requested_size, dst.usable_region_size) == (src.requested_size, src.usable_region_size)
    assert rdl.populated == {0, 1, 2, 10, 11, 12, 13, 14}
    assert rdl.events == [("populate", 0, 3 * BS), ("populate", 10 * BS, 5 * BS)]
    assert sizes == [8 * BS]
    if backing != "fake":
        assert dst.ram.resident_bytes(0, dst.region_size) == 0  # unplugged ranges discarded
    dst.unregister_listener(rdl)


def test_load_corrupt_or_mismatching_changes_nothing(make: Factory) -> None:
    src = _source(make)
    data = src.save_state()
    dst = make.device(256 * MiB, requested_size=0)
    before = (dst.bitmap_bytes(), dst.plugged_size, dst.requested_size, dst.usable_region_size)
    flipped = bytearray(data)
    flipped[80] ^= 1
    bad_sanity = encode_state(type(decode_state(data))(**{**_fields(decode_state(data)), "node": 1}))
    cases = [
        (b"", "too short"),
        (b"XXXXXXXX" + data[8:], "magic"),
        (bytes(flipped), "checksum"),
        (data[:-5] + data[-4:], "length"),
        (bad_sanity, "does not match"),
    ]
    for blob, msg in cases:
        with pytest.raises(StateError, match=msg):
            dst.load_state(blob)
        assert (dst.bitmap_bytes(), dst.plugged_size, dst.requested_size, dst.usable_region_size) == before
    other = make.device(128 * MiB, requested_size=0)
    with pytest.raises(StateError, match="region size"):
        other.load_state(data)
    with pytest.raises(StateError, match="has memory plugged"):
        src.load_state(data)
    inconsistent = _fields(decode_state(data)) | {"plugged_size": 2 * BS}
    with pytest.raises(StateError, match="disagrees"):
        dst.load_state(encode_state(type(decode_state(data))(**inconsistent)))


def test_load_listener_refusal_rolls_back_to_unplugged(make: Factory) -> None:
    data = _source(make).save_state()
    dst = make.device(256 * MiB, requested_size=0)
    ok = RecordingListener()
    bad = RecordingListener(refuse=lambda s: s.offset_within_region >= 10 * BS)
    dst.register_listener(ok, whole(dst))
    dst.register_listener(bad, whole(dst))
    with pytest.raises(StateError, match="refused"):
        dst.load_state(data)
    assert dst.plugged_size == 0 and ok.populated == set() and bad.populated == set()
    assert (dst.requested_size, dst.usable_region_size) == (0, 0)
    dst.unregister_listener(bad)
    dst.load_state(data)
    assert ok.populated == {0, 1, 2, 10, 11, 12, 13, 14}
    dst.unregister_listener(ok)


def test_load_prealloc_failure_changes_nothing(make: Factory) -> None:
    data = _source(make).save_state()
    dst = make.device(256 * MiB, requested_size=0, prealloc=True)
    with faults.inject("populate", nth=2), pytest.raises(StateError, match="preallocation"):
        dst.load_state(data)
    assert dst.plugged_size == 0


def test_load_with_dynamic_memslots_notifies_each_block_once(make: Factory) -> None:
    src = make.device(4 * GiB, requested_size=4 * GiB)
    src.plug(ADDR + GiB - BS, 2)
    src.plug(ADDR + 3 * GiB, 1)
    dst = make.device(4 * GiB, requested_size=0, dynamic_memslots=True)
    _root, space = make.map(dst)
    vfio = VfioLikeListener()  # strict: a duplicate populate fails the test
    space.register_listener(vfio)
    early = RecordingListener()
    dst.register_listener(early, whole(dst))
    dst.load_state(src.save_state())
    assert dst.mapped_memslots == 3 and len(vfio.rdls) == 3
    assert sum(len(r.populated) for r in vfio.rdls.values()) == 3
    assert early.populated == {GiB // BS - 1, GiB // BS, 3 * GiB // BS}
    dst.unregister_listener(early)


def _fields(image):  # type: ignore[no-untyped-def]
    return {f: getattr(image, f) for f in image.__slots__}


# -- trace -----------------------------------------------------------------------------


def test_trace_parser_junk_and_errors() -> None:
    lines = [
        "",
        "qemu-system-x86_64: warning: something",
        "1@2.5:virtio_mem_plug_request addr=0x100000000 nb_blocks=64",
        "1@2.6:virtio_mem_send_response type=0",
        "1@2.7:some_other_event x=1",
        "1@2.8:virtio_mem_resized_usable_region old_size=0x0new_size=0x50000000",
        "1@2.9:ram_block_discard_range rb@0x7f00 + 0x1000: madvise: 1 fallocate: 0 ret: 0",
    ]
    log = parse_trace(lines)
    assert log.skipped == [1, 2] and log.ignored == 1
    assert log.events[0] == PlugRequest(3, 1, 2.5, 0x100000000, 64)
    assert isinstance(log.events[1], SendResponse) and log.events[1].type is ResponseType.ACK
    assert log.events[2] == ResizedUsableRegion(6, 1, 2.8, 0, 0x50000000)
    assert isinstance(log.events[3], DiscardRange) and log.events[3].length == 0x1000
    bad = [*lines, "1@3.0:virtio_mem_send_response type=zz"]
    with pytest.raises(TraceParseError, match="line 8"):
        parse_trace(bad)
    assert parse_trace(bad, strict=False).skipped == [1, 2, 8]
    with pytest.raises(TraceParseError, match="line 1"):
        parse_trace(["1@1.0:virtio_mem_send_response type=9"])


def test_qemu_trace_replays_identically(make: Factory) -> None:
    log = parse_trace_file(sample_trace())
    assert not log.skipped and len(log.events) == 48
    dev = make.device(4 * GiB, requested_size=0, addr=0x100000000, block_size=2 * MiB)
    report = replay_trace(log, dev)
    assert report.ok, report.mismatches
    assert report.requests == 16 and report.responses == {"ACK": 16}
    assert max(report.plugged_sizes) == GiB and report.plugged_sizes[-1] == 0
    assert report.usable_region_sizes == [0, 0, 0x50000000]
    assert report.requested_size_writes == [GiB]
    assert report.device_discards[0] == (0, 4 * GiB)
    assert report.device_discards[1:] == [(0x38000000 - i * 0x8000000, 0x8000000) for i in range(8)]
    assert len(report.skipped_discards) == 1  # QEMU 7.2's discard in the reset unplug-all
