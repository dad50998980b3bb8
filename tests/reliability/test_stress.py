"""Concurrency stress (bounded): every worker at once, invariants checked continuously,
no hang. With dynamic memslots the request path and topology updates take the topology
lock and the device lock; before the lock-order fix this deadlocked within milliseconds.
"""

from __future__ import annotations

import pytest

from ramdiscard.fuzz.stress import run_stress


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dynamic_memslots", [True, False])
def test_stress_keeps_invariants_and_never_hangs(dynamic_memslots: bool) -> None:
    result = run_stress(seconds=2.5, seed=11, dynamic_memslots=dynamic_memslots, join_timeout=10.0)
    assert result.ok, result.summary()
    assert result.checks > 50
    # Every kind of worker made progress while the others ran.
    for kind in (
        "request:plug",
        "request:unplug",
        "requested_size",
        "register",
        "attach",
        "map",
        "save_state",
    ):
        assert result.ops[kind] > 0, result.summary()


def test_stress_reports_a_planted_violation() -> None:
    """The checker must be able to fail: a listener whose view is corrupted mid-run."""
    from ramdiscard.fuzz import stress

    original = stress._Stress.listeners

    def corrupt(self: stress._Stress, rng: object) -> None:
        lst = stress.ViewListener(block_size=stress.BS, name="corrupt")
        self.dev.register_listener(lst, stress.MemoryRegionSection(self.mr, 0, stress.SIZE, stress.ADDR))
        with self.dev.lock:
            lst.view[0] = not lst.view[0]
        self.stop.wait(0.2)
        self.dev.unregister_listener(lst)

    stress._Stress.listeners = corrupt  # type: ignore[method-assign]
    try:
        result = run_stress(seconds=1.0, seed=3)
    finally:
        stress._Stress.listeners = original  # type: ignore[method-assign]
    assert not result.ok and result.violations
