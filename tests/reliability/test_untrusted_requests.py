"""Guest-input checks without a dedicated test elsewhere (docs/security.md)."""

from __future__ import annotations

import random

from ramdiscard.fuzz.targets.virtio import FakeRam
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB

SIZE = 64 * MiB
BS = 2 * MiB


def _device(addr: int) -> VirtioMem:
    mr = MemoryRegion.new_ram("untrusted", FakeRam(SIZE))
    return VirtioMem(mr, addr=addr, block_size=BS, requested_size=SIZE, policy=DiscardPolicy())


def test_request_range_wrapping_past_2_64_is_error_and_changes_nothing() -> None:
    top = (1 << 64) - SIZE  # the device ends exactly at the top of the address space
    dev = _device(top)
    try:
        assert dev.plug(top + SIZE - BS, 1) is ResponseType.ACK
        for kind in (dev.plug, dev.unplug):
            assert kind(top + SIZE - BS, 0xFFFF) is ResponseType.ERROR
        assert dev.state(top + SIZE - BS, 0xFFFF)[0] is ResponseType.ERROR
        assert dev.plugged_size == BS
    finally:
        dev.unplug_all()
        dev.unrealize()


def test_config_space_writes_change_nothing() -> None:
    dev = _device(1 << 32)
    try:
        before = dev.config_bytes()
        rng = random.Random(5)
        for _ in range(200):
            dev.config_write(rng.randrange(64), rng.randbytes(rng.randrange(1, 16)))
        assert dev.config_bytes() == before
        assert dev.metrics.config_writes_ignored == 200
    finally:
        dev.unrealize()
