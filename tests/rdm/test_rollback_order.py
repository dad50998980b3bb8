"""Rollback order of a refused populate, observed through one shared event log.

The order is LIFO: when a listener refuses a populate,

* the listeners that had already accepted the refused range are told ``notify_discard``
  for it in the reverse order of their ``notify_populate``, before anything else is undone;
* each listener gets its rollback discards in the reverse order of the populates it
  accepted during the refused operation (the last run first);
* the refusing listener gets no discard for the range it refused (it undoes that
  itself); every accepted populate is discarded exactly once; the provider's state is unchanged.

The relative order of *different* listeners for runs every listener accepted is not part
of the contract, so it is not checked. Everything goes through the public API
(register_listener, set_populated, plug, add/remove source), so these tests hold for any
implementation of the notification walk.
"""

from __future__ import annotations

from collections.abc import Callable

from ramdiscard.memory import MemoryRegion, MemoryRegionSection, RegionKind
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import AggregateManager, BlockStateManager, DiscardPolicy, RamDiscardListener
from ramdiscard.units import GiB, MiB
from tests.conftest import FakeRam
from tests.providers.virtio_mem.conftest import FakeRam as DeviceRam

G = 2 * MiB
SIZE = 32 * MiB

Event = tuple[str, str, int, int]


class LogListener(RamDiscardListener):
    """Appends ``(name, kind, offset, size)`` to a log shared with other listeners."""

    def __init__(
        self, name: str, log: list[Event], refuse: Callable[[MemoryRegionSection], bool] | None = None
    ) -> None:
        self.name = name
        self.log = log
        self.refuse = refuse

    def notify_populate(self, section: MemoryRegionSection) -> None:
        if self.refuse is not None and self.refuse(section):
            self.log.append((self.name, "refuse", section.offset_within_region, section.size))
            raise OSError(16, f"{self.name} refuses")
        self.log.append((self.name, "populate", section.offset_within_region, section.size))

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.log.append((self.name, "discard", section.offset_within_region, section.size))


def _region(size: int = SIZE) -> MemoryRegion:
    return MemoryRegion("ram", size, RegionKind.RAM, ram=FakeRam(size))


def _whole(mr: MemoryRegion) -> MemoryRegionSection:
    return MemoryRegionSection(mr, 0, mr.size)


def _refusing_at(offset: int) -> Callable[[MemoryRegionSection], bool]:
    return lambda s: s.offset_within_region <= offset < s.end


def check_lifo(log: list[Event], refuser: str, accepting: list[str], runs: int) -> None:
    """Assert the module's rollback rules on the events of one refused operation.

    ``accepting``: the listeners that accept, in notification order; ``runs``: how many
    runs each of them accepted, the refused one included (the refuser accepted one less).
    """
    refusals = [i for i, e in enumerate(log) if e[1] == "refuse"]
    assert len(refusals) == 1 and log[refusals[0]][0] == refuser, log
    cut = refusals[0]
    before, after = log[:cut], log[cut + 1 :]
    assert all(e[1] == "populate" for e in before), before
    assert all(e[1] == "discard" for e in after), after
    refused = (log[cut][2], log[cut][3])
    for name in [*accepting, refuser]:
        populated = [(e[2], e[3]) for e in before if e[0] == name]
        assert len(populated) == (runs if name != refuser else runs - 1), (name, populated)
        discarded = [(e[2], e[3]) for e in after if e[0] == name]
        assert discarded == populated[::-1], f"{name}: rollback must undo its runs last first"
    # The refused run is undone first, listeners in reverse order of notification.
    head = [(e[0], (e[2], e[3])) for e in after[: len(accepting)]]
    assert head == [(name, refused) for name in reversed(accepting)], head
    assert len(after) == len(before)


def _setup_block_state(log: list[Event], refuse_at: int) -> tuple[BlockStateManager, list[str]]:
    mr = _region()
    mgr = BlockStateManager(mr, G)
    # Newest first: the refuser, registered first, is notified last.
    mgr.register_listener(LogListener("R", log, _refusing_at(refuse_at)), _whole(mr))
    names = ["C", "B", "A"]
    for name in names:
        mgr.register_listener(LogListener(name, log), _whole(mr))
    return mgr, names[::-1]


def test_block_state_single_run_rolls_back_listeners_in_reverse() -> None:
    log: list[Event] = []
    mgr, order = _setup_block_state(log, refuse_at=0)
    assert [rdl.name for rdl in mgr.listeners if isinstance(rdl, LogListener)] == [*order, "R"]
    try:
        mgr.set_populated(0, 4 * G)
    except OSError:
        pass
    else:
        raise AssertionError("the refusal must propagate")
    check_lifo(log, "R", order, runs=1)
    assert mgr.populated_size == 0


def test_block_state_multi_run_rolls_back_runs_in_reverse() -> None:
    log: list[Event] = []
    mgr, order = _setup_block_state(log, refuse_at=6 * G)
    # Blocks 1 and 3 populated already, so [0, 7) has the discarded runs 0, 2, 4..6.
    mgr.set_populated(1 * G, G)
    mgr.set_populated(3 * G, G)
    log.clear()
    try:
        mgr.set_populated(0, 7 * G)
    except OSError:
        pass
    else:
        raise AssertionError("the refusal must propagate")
    check_lifo(log, "R", order, runs=3)
    assert [(e[2], e[3]) for e in log if e[0] == "A" and e[1] == "populate"] == [
        (0, G),
        (2 * G, G),
        (4 * G, 3 * G),
    ]
    assert list(mgr.populated_runs()) == [(G, 2 * G), (3 * G, 4 * G)]


def test_virtio_mem_plug_refusal_rolls_back_in_reverse() -> None:
    log: list[Event] = []
    mr = MemoryRegion.new_ram("vmem", DeviceRam(SIZE))
    dev = VirtioMem(mr, addr=4 * GiB, block_size=G, requested_size=SIZE, policy=DiscardPolicy())
    try:
        dev.register_listener(LogListener("R", log, _refusing_at(2 * G)), _whole(mr))
        for name in ("D", "C", "B", "A"):
            dev.register_listener(LogListener(name, log), _whole(mr))
        assert dev.plug(4 * GiB, 2) is ResponseType.ACK
        log.clear()
        assert dev.plug(4 * GiB + 2 * G, 3) is ResponseType.BUSY
        check_lifo(log, "R", ["A", "B", "C", "D"], runs=1)
        assert dev.plugged_size == 2 * G
        assert list(dev.plugged_ranges()) == [(0, 2 * G)]
    finally:
        for rdl in dev.listeners:
            dev.unregister_listener(rdl)
        dev.unrealize()


def _setup_aggregate(
    log: list[Event], refuse_at: int
) -> tuple[AggregateManager, BlockStateManager, BlockStateManager]:
    mr = _region()
    s1, s2 = BlockStateManager(mr, G), BlockStateManager(mr, G)
    # s2 has blocks 0, 2 and 4..6 populated: a populate of [0, 7) by s1 shows as three runs.
    for first, n in ((0, 1), (2, 1), (4, 3)):
        s2.set_populated(first * G, n * G)
    agg = AggregateManager(mr)
    agg.add_source(s1)
    agg.add_source(s2)
    agg.register_listener(LogListener("R", log, _refusing_at(refuse_at)), _whole(mr))
    for name in ("C", "B", "A"):
        agg.register_listener(LogListener(name, log), _whole(mr))
    return agg, s1, s2


def test_aggregate_source_populate_rolls_back_runs_in_reverse() -> None:
    log: list[Event] = []
    agg, s1, _ = _setup_aggregate(log, refuse_at=6 * G)
    log.clear()
    try:
        s1.set_populated(0, 7 * G)
    except OSError:
        pass
    else:
        raise AssertionError("the refusal must propagate")
    check_lifo(log, "R", ["A", "B", "C"], runs=3)
    assert s1.populated_size == 0
    seen: list[tuple[int, int]] = []
    agg.replay_populated(_whole(agg.region), lambda s: seen.append((s.offset_within_region, s.size)))
    assert seen == []


def test_aggregate_remove_source_rolls_back_runs_in_reverse() -> None:
    log: list[Event] = []
    agg, s1, s2 = _setup_aggregate(log, refuse_at=6 * G)
    log.clear()
    try:
        agg.remove_source(s1)
    except OSError:
        pass
    else:
        raise AssertionError("the refusal must propagate")
    check_lifo(log, "R", ["A", "B", "C"], runs=3)
    assert agg.sources == (s1, s2)
