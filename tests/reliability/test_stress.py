"""Concurrency stress (bounded): every worker at once, invariants checked continuously,
no hang. With dynamic memslots the request path and topology updates take the topology
lock and the device lock; before the lock-order fix this deadlocked within milliseconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from ramdiscard.fuzz.stress import run_stress


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dynamic_memslots", [True, False])
def test_stress_keeps_invariants_and_never_hangs(dynamic_memslots: bool) -> None:
    # A fixed amount of work (60 s is only the bound): the outcome does not depend on speed.
    result = run_stress(
        seconds=60, seed=11, dynamic_memslots=dynamic_memslots, join_timeout=10.0, iterations=100
    )
    assert result.ok, result.summary()
    workers = {name: n for name, n in result.iterations.items() if name != "checker"}
    assert len(workers) == 8 and set(workers.values()) == {100}, result.iterations
    assert result.checks >= 1
    # Every kind of operation happened (the choices come from the seeded PRNGs).
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
            if lst.view.size == 0:  # sized on the first notification; nothing populated yet
                lst.view = np.zeros(stress.SIZE // stress.PAGE, dtype=bool)
            lst.view[0] = not lst.view[0]
            seen = len(self.result.violations)
        # Wait (bounded) until the checker has reported something.
        deadline = time.monotonic() + 10
        while len(self.result.violations) == seen and time.monotonic() < deadline:
            self.stop.wait(0.001)
        self.dev.unregister_listener(lst)

    stress._Stress.listeners = corrupt  # type: ignore[method-assign]
    try:
        result = run_stress(seconds=60, seed=3, iterations=20)
    finally:
        stress._Stress.listeners = original  # type: ignore[method-assign]
    assert not result.ok and result.violations, result.summary()
