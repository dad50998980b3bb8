"""A 1 TiB region works at 2 MiB and at 4 KiB granularity: state changes, queries and
replays cost what the touched range or the runs cost, not the region size."""

from __future__ import annotations

import pytest

from ramdiscard import BlockStateManager, MemoryRegion, MemoryRegionSection, RamDiscardListener
from tests.conftest import FakeRam

TiB = 1 << 40
MiB = 1 << 20


class Counter(RamDiscardListener):
    double_discard_supported = True

    def __init__(self) -> None:
        self.populated = 0

    def notify_populate(self, section: MemoryRegionSection) -> None:
        self.populated += section.size

    def notify_discard(self, section: MemoryRegionSection) -> None:
        pass


@pytest.mark.parametrize("gran", [2 * MiB, 4096])
def test_one_tib_region(gran: int) -> None:
    mr = MemoryRegion.new_ram("big", FakeRam(TiB))
    m = BlockStateManager(mr, gran)
    assert m.nb_blocks == TiB // gran
    whole = MemoryRegionSection(mr, 0, TiB)
    m.set_populated(0, 64 * gran)
    m.set_populated(TiB - 64 * gran, 64 * gran)
    m.set_populated(TiB // 2, 256 * MiB)
    c = Counter()
    m.register_listener(c, whole)
    assert c.populated == 128 * gran + 256 * MiB == m.populated_size
    runs: list[tuple[int, int]] = []
    m.replay_populated(whole, lambda s: runs.append((s.offset_within_region, s.size)))
    assert runs == [(0, 64 * gran), (TiB // 2, 256 * MiB), (TiB - 64 * gran, 64 * gran)]
    holes = list(m.discarded_runs())
    assert holes[0] == (64 * gran, TiB // 2)  # (start, end) in region offsets
    assert m.is_populated(MemoryRegionSection(mr, TiB - gran, gran))
    assert not m.is_populated(whole)
    m.set_discarded(0, TiB)
    assert m.populated_size == 0
    m.unregister_listener(c)
