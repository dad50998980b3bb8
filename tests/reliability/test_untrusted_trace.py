"""Trace-file regression tests for the bugs the ``trace`` fuzz target found (docs/security.md)."""

from __future__ import annotations

import pytest

from ramdiscard.fuzz.targets.virtio import FakeRam
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.replay.events import TraceParseError, parse_trace
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import GiB, MiB


def test_trace_line_with_an_absurd_pid_is_junk_not_a_crash() -> None:
    line = "9" * 5000 + "@1.0:virtio_mem_plug_request addr=0x0 nb_blocks=1\n"
    for strict in (True, False):
        log = parse_trace([line], strict=strict)
        assert log.skipped == [1] and not log.events


@pytest.mark.parametrize(
    "args",
    ["addr=0x10000000000000000 nb_blocks=1", "addr=0x0 nb_blocks=65536", "addr=0x0 nb_blocks=" + "9" * 30],
)
def test_trace_request_fields_must_fit_the_wire(args: str) -> None:
    line = f"1@1.0:virtio_mem_plug_request {args}\n"
    with pytest.raises(TraceParseError) as info:
        parse_trace([line])
    assert info.value.line == 1
    assert parse_trace([line], strict=False).skipped == [1]


def test_trace_request_fields_at_the_wire_limits_parse() -> None:
    log = parse_trace(["1@1.0:virtio_mem_unplug_request addr=0xffffffffffffffff nb_blocks=65535\n"])
    (ev,) = log.events
    assert ev.addr == (1 << 64) - 1 and ev.nb_blocks == 0xFFFF  # type: ignore[attr-defined]


def test_replay_reports_a_requested_size_the_device_cannot_take() -> None:
    # new_size 0x30000001 - 256 MiB extent is not a block multiple.
    log = parse_trace(["1@1.0:virtio_mem_resized_usable_region old_size=0x0 new_size=0x30000001\n"])
    mr = MemoryRegion.new_ram("t", FakeRam(4 * GiB))
    dev = VirtioMem(mr, addr=4 * GiB, block_size=2 * MiB, requested_size=0, policy=DiscardPolicy())
    try:
        report = replay_trace(log, dev)
    finally:
        dev.unrealize()
    assert not report.ok and report.mismatches[0].what == "requested size"
    assert report.requested_size_writes == []
