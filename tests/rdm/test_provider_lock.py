"""A provider's lock is one object for its whole life: joining or leaving an aggregate never
swaps it under a thread that is waiting on it."""

from __future__ import annotations

import threading
from collections.abc import Callable

from ramdiscard.memory import MemoryRegionSection
from ramdiscard.rdm import (
    AggregateManager,
    BlockStateManager,
    add_ram_discard_source,
    region_lock,
    remove_ram_discard_source,
)
from ramdiscard.units import KiB, MiB
from tests.rdm.agg_helpers import Recorder, make_region

G = 64 * KiB
TIMEOUT = 10.0


def test_lock_is_the_same_object_standalone_joined_and_left() -> None:
    mr = make_region(1 * MiB)
    a, b = BlockStateManager(mr, G), BlockStateManager(mr, G)
    locks = (a.lock, b.lock)
    assert add_ram_discard_source(mr, a) is a
    agg = add_ram_discard_source(mr, b)
    assert isinstance(agg, AggregateManager)
    assert (a.lock, b.lock) == locks and agg.lock is a.lock is b.lock is region_lock(mr)
    remove_ram_discard_source(mr, b)
    remove_ram_discard_source(mr, a)
    assert a.lock is locks[0] and b.lock is locks[1]
    assert region_lock(make_region(1 * MiB)) is not a.lock  # another region, another lock


def _other_thread_can_enter(lock_of: Callable[[], threading.RLock]) -> bool:
    """Whether a fresh thread can take the provider's current lock right now."""
    result: list[bool] = []

    def probe() -> None:
        lock = lock_of()
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        result.append(got)

    t = threading.Thread(target=probe)
    t.start()
    t.join(TIMEOUT)
    assert result, "probe thread did not finish"
    return result[0]


def _waiter_across(
    change: Callable[[], None], waited_on: threading.RLock, lock_of: Callable[[], threading.RLock]
) -> bool:
    """A thread queues on ``waited_on`` (what ``with self._lock`` in a provider method
    evaluates) while this thread holds it and runs ``change``; once the waiter is inside,
    report whether another thread can still enter the provider."""
    inside, leave = threading.Event(), threading.Event()

    def waiter() -> None:
        with waited_on:
            inside.set()
            leave.wait(TIMEOUT)

    waited_on.acquire()
    t = threading.Thread(target=waiter)
    try:
        t.start()
        change()
    finally:
        waited_on.release()
    try:
        assert inside.wait(TIMEOUT), "the waiter never got the lock"
        return _other_thread_can_enter(lock_of)
    finally:
        leave.set()
        t.join(TIMEOUT)
        assert not t.is_alive()


def test_a_thread_waiting_across_a_join_excludes_everyone_else() -> None:
    mr = make_region(1 * MiB)
    a, b = BlockStateManager(mr, G), BlockStateManager(mr, G)
    agg = AggregateManager(mr)
    agg.add_source(a)
    assert not _waiter_across(lambda: agg.add_source(b), b.lock, lambda: b.lock)
    assert b.sink is agg


def test_a_thread_waiting_across_a_leave_excludes_everyone_else() -> None:
    mr = make_region(1 * MiB)
    a, b = BlockStateManager(mr, G), BlockStateManager(mr, G)
    agg = AggregateManager(mr)
    agg.add_source(a)
    agg.add_source(b)
    assert not _waiter_across(lambda: agg.remove_source(b), b.lock, lambda: b.lock)
    assert b.sink is None


def test_state_changes_racing_joins_and_leaves_keep_the_listener_exact() -> None:
    mr = make_region(1 * MiB)
    a, b = BlockStateManager(mr, G), BlockStateManager(mr, G)
    a.set_populated(0, mr.size)
    agg = AggregateManager(mr)
    agg.add_source(a)
    rec = Recorder()
    whole = MemoryRegionSection(mr, 0, mr.size)
    agg.register_listener(rec, whole)
    start = threading.Barrier(2, timeout=TIMEOUT)
    errors: list[BaseException] = []

    def churn() -> None:
        try:
            start.wait()
            for i in range(300):
                offset = (i * 7 % 16) * G
                if i % 2:
                    b.set_populated(offset, G)
                else:
                    b.set_discarded(offset, G)
        except BaseException as exc:  # reported below
            errors.append(exc)

    t = threading.Thread(target=churn)
    t.start()
    start.wait()
    for _ in range(100):
        agg.add_source(b)
        agg.remove_source(b)
    t.join(TIMEOUT)
    assert not t.is_alive() and errors == []
    expected: set[int] = set()
    page = 4 * KiB
    agg.replay_populated(
        whole, lambda run: expected.update(range(run.offset_within_region // page, run.end // page))
    )
    assert rec.view == expected
