"""The postcopy bench: a run that raises fails its own row only."""

from __future__ import annotations

from typing import Any

import pytest

from ramdiscard.bench import postcopy
from ramdiscard.hostmem import uffd


def test_a_failing_run_fails_its_row_and_the_other_row_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    if uffd.available() is not None:
        pytest.skip(f"userfaultfd: {uffd.available()}")
    calls: list[tuple[bool, int]] = []

    def fake_run(region: int, plugged: int, preempt: bool, rounds: int = 0) -> dict[str, Any]:
        calls.append((preempt, rounds))
        if rounds:
            raise RuntimeError("a page request went unanswered")
        figures = {"p50": 1e-4, "p99": 2e-3 if preempt else 9e-3, "faults": 10, "zero_faults": 1}
        return {
            **figures, "requests": 5, "unplugged_requests": 0, "write_p99": 1e-3, "total": 1.0,
            "downtime": 1e-3, "needed": plugged, "request_bytes": 1 << 20, "kept": 0,
        }  # fmt: skip

    monkeypatch.setattr(postcopy, "one_run", fake_run)
    rows = postcopy.run(quick=True)
    assert calls == [(True, 0), (False, 0), (True, 1)]
    assert [("failed" in r) for r in rows] == [False, True]
    assert rows[0]["ns_per_run"] == 2_000_000 and rows[0]["raw_ns"] == 9_000_000
    assert rows[1]["name"].endswith("after-one-precopy-round-fault-p99")
    assert rows[1]["failed"] == "RuntimeError: a page request went unanswered"
