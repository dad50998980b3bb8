"""Public accessors that replaced reads of VirtioMem privates (busy predicate, extent,
plugged size derived from the bitmap)."""

from __future__ import annotations

from ramdiscard.migration.busy import frozen
from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB
from tests.consumers.vfio.conftest import ADDR, World


def test_busy_predicate_is_readable_and_restored_after_a_freeze() -> None:
    w = World()
    try:
        dev = w.vmem(16 * MiB, "fake", policy=DiscardPolicy(), usable_extent=4 * MiB)
        assert dev.busy_predicate is None and dev.usable_extent == 4 * MiB

        def mine() -> bool:
            return False

        dev.set_busy_predicate(mine)
        with frozen([dev]):
            assert dev.busy_predicate is not mine and dev.is_busy()
            assert dev.plug(ADDR, 1) is ResponseType.BUSY
        assert dev.busy_predicate is mine and not dev.is_busy()
    finally:
        w.close()


def test_plugged_size_is_the_bitmap_popcount_through_every_path() -> None:
    w = World()
    try:
        dev = w.vmem(32 * MiB, "fake", policy=DiscardPolicy())
        sizes: list[int] = []
        dev.add_size_change_notifier(lambda _id, size: sizes.append(size))
        assert dev.plug(ADDR, 4) is ResponseType.ACK
        assert dev.unplug(ADDR + 2 * MiB, 1) is ResponseType.ACK
        plugged = sum(size for _, size in dev.plugged_ranges())
        assert dev.plugged_size == dev.populated_size == plugged == 3 * 2 * MiB
        assert dev.config().plugged_size == dev.plugged_size
        image = dev.save_state()
        assert dev.unplug_all() is ResponseType.ACK and dev.plugged_size == 0
        dev.load_state(image)
        assert dev.plugged_size == 3 * 2 * MiB
        assert sizes == [8 * MiB, 6 * MiB, 0, 6 * MiB]
    finally:
        w.close()
