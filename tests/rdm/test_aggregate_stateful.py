"""Stateful check of an aggregate with two sources of different granularity.

Random conversions (fine source), plugs (coarse source), source add/remove, listener
register/unregister and injected listener refusals run against a reference model; after
every step each listener's accumulated view equals aggregate-populated ∩ its section, and
each source's bitmap equals the model.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from ramdiscard.rdm import AggregateManager
from ramdiscard.units import MiB
from tests.rdm.agg_helpers import LARGE, SMALL, Recorder, Source, make_region, section

SIZE = 8 * MiB
PAGES = SIZE // SMALL
PER_BLOCK = LARGE // SMALL
ALL = frozenset(range(PAGES))


class TwoSources(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.mr = make_region(SIZE)
        self.fine = Source(self.mr, SMALL)
        self.coarse = Source(self.mr, LARGE)
        self.agg = AggregateManager(self.mr)
        self.agg.add_source(self.fine)
        self.agg.add_source(self.coarse)
        self.fine_model: set[int] = set()
        self.coarse_model: set[int] = set()
        self.coarse_attached = True
        self.listeners: list[tuple[Recorder, set[int]]] = []

    def aggregate(self) -> set[int]:
        return self.fine_model & (self.coarse_model if self.coarse_attached else ALL)

    def arm(self, refuse: int | None) -> Recorder | None:
        if refuse is None or not self.listeners:
            return None
        victim = self.listeners[refuse % len(self.listeners)][0]
        victim.fail_from = victim.populates + 1
        return victim

    @staticmethod
    def disarm(victim: Recorder | None) -> None:
        if victim is not None:
            victim.fail_from = None

    @rule(
        first=st.integers(0, PAGES - 1),
        count=st.integers(1, 64),
        shared=st.booleans(),
        refuse=st.none() | st.integers(0, 3),
    )
    def convert(self, first: int, count: int, shared: bool, refuse: int | None) -> None:
        count = min(count, PAGES - first)
        pages = set(range(first, first + count))
        victim = self.arm(refuse)
        try:
            if shared:
                self.fine.set_populated(first * SMALL, count * SMALL)
            else:
                self.fine.set_discarded(first * SMALL, count * SMALL)
        except OSError:
            assert shared and victim is not None
        else:
            self.fine_model = self.fine_model | pages if shared else self.fine_model - pages
        finally:
            self.disarm(victim)

    @rule(
        block=st.integers(0, SIZE // LARGE - 1),
        nb=st.integers(1, 2),
        plug=st.booleans(),
        refuse=st.none() | st.integers(0, 3),
    )
    def plug(self, block: int, nb: int, plug: bool, refuse: int | None) -> None:
        nb = min(nb, SIZE // LARGE - block)
        pages = set(range(block * PER_BLOCK, (block + nb) * PER_BLOCK))
        victim = self.arm(refuse)
        try:
            if plug:
                self.coarse.set_populated(block * LARGE, nb * LARGE)
            else:
                self.coarse.set_discarded(block * LARGE, nb * LARGE)
        except OSError:
            assert plug and victim is not None
        else:
            self.coarse_model = self.coarse_model | pages if plug else self.coarse_model - pages
        finally:
            self.disarm(victim)

    @rule(refuse=st.none() | st.integers(0, 3))
    def toggle_coarse(self, refuse: int | None) -> None:
        victim = self.arm(refuse)
        try:
            if self.coarse_attached:
                self.agg.remove_source(self.coarse)
            else:
                self.agg.add_source(self.coarse)
        except OSError:
            assert self.coarse_attached and victim is not None
        else:
            self.coarse_attached = not self.coarse_attached
        finally:
            self.disarm(victim)

    @precondition(lambda self: len(self.listeners) < 4)
    @rule(
        start=st.integers(0, SIZE - 1), size=st.integers(1, SIZE), double=st.booleans(), refuse=st.booleans()
    )
    def register(self, start: int, size: int, double: bool, refuse: bool) -> None:
        size = min(size, SIZE - start)
        rec = Recorder(double=double, fail_from=1 if refuse else None)
        sec_pages = set(range(start // SMALL, (start + size + SMALL - 1) // SMALL))
        try:
            self.agg.register_listener(rec, section(self.mr, start, size))
        except OSError:
            assert refuse and self.aggregate() & sec_pages
            assert rec.section is None and rec not in self.agg.listeners
            return
        rec.fail_from = None
        self.listeners.append((rec, sec_pages))

    @precondition(lambda self: bool(self.listeners))
    @rule(index=st.integers(0, 3))
    def unregister(self, index: int) -> None:
        rec, _ = self.listeners.pop(index % len(self.listeners))
        self.agg.unregister_listener(rec)
        assert rec.view == set()

    @invariant()
    def views_match(self) -> None:
        agg = self.aggregate()
        for rec, sec_pages in self.listeners:
            assert rec.view == agg & sec_pages

    @invariant()
    def sources_match(self) -> None:
        fine = {i for s, e in self.fine.populated_runs() for i in range(s // SMALL, e // SMALL)}
        coarse = {i for s, e in self.coarse.populated_runs() for i in range(s // SMALL, e // SMALL)}
        assert fine == self.fine_model and coarse == self.coarse_model
        assert self.agg.sources == ((self.fine, self.coarse) if self.coarse_attached else (self.fine,))


TwoSources.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestTwoSources = TwoSources.TestCase
