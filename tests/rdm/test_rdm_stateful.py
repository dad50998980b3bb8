"""Model-based test of the RDM contract: random state changes, listeners over random
(overlapping, unaligned) sections and injected refusals, checked after every step."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, initialize, invariant, rule

from ramdiscard import BlockStateManager, MemoryRegion, MemoryRegionSection, RamDiscardListener
from tests.conftest import FakeRam

ATOM = 512  # sections are unaligned to the granularity, but multiples of this
GRAN = 4096
NBLOCKS = 48
SIZE = GRAN * NBLOCKS
ATOMS_PER_BLOCK = GRAN // ATOM


class Refused(Exception):
    pass


class ModelListener(RamDiscardListener):
    """Keeps its accumulated view as a set of atoms and checks the protocol strictly."""

    def __init__(self, double: bool) -> None:
        self.double_discard_supported = double
        self.view: set[int] = set()
        self.refuse_next = False

    @staticmethod
    def atoms(section: MemoryRegionSection) -> set[int]:
        assert section.offset_within_region % ATOM == 0 and section.size % ATOM == 0
        first = section.offset_within_region // ATOM
        return set(range(first, first + section.size // ATOM))

    def notify_populate(self, section: MemoryRegionSection) -> None:
        assert self.section is not None
        assert section.offset_within_region >= self.section.offset_within_region
        assert section.end <= self.section.end, "notification outside the listener's section"
        atoms = self.atoms(section)
        if self.refuse_next:
            self.refuse_next = False
            raise Refused
        assert not (atoms & self.view), "populate of memory already populated"
        self.view |= atoms

    def notify_discard(self, section: MemoryRegionSection) -> None:
        assert self.section is not None
        assert (
            section.end <= self.section.end
            and section.offset_within_region >= self.section.offset_within_region
        )
        atoms = self.atoms(section)
        if not self.double_discard_supported:
            assert atoms <= self.view, "discard of memory never populated (double discard)"
        self.view -= atoms


class RdmMachine(RuleBasedStateMachine):
    listeners = Bundle("listeners")

    @initialize()
    def setup(self) -> None:
        self.mr = MemoryRegion.new_ram("ram", FakeRam(SIZE))
        self.m = BlockStateManager(self.mr, GRAN)
        self.model: set[int] = set()  # populated blocks
        self.registered: list[ModelListener] = []
        self.unregistered: list[ModelListener] = []

    def _populated_atoms(self) -> set[int]:
        return {b * ATOMS_PER_BLOCK + i for b in self.model for i in range(ATOMS_PER_BLOCK)}

    @rule(first=st.integers(0, NBLOCKS - 1), n=st.integers(1, 12), refuse=st.integers(-1, 4))
    def populate(self, first: int, n: int, refuse: int) -> None:
        n = min(n, NBLOCKS - first)
        if 0 <= refuse < len(self.registered):
            self.registered[refuse].refuse_next = True
        touches_refuser = any(
            lst.refuse_next
            and lst.section is not None
            and lst.section.intersect(first * GRAN, n * GRAN) is not None
            and any(
                b not in self.model
                for b in range(first, first + n)
                if lst.section.intersect(b * GRAN, GRAN) is not None
            )
            for lst in self.registered
        )
        try:
            self.m.set_populated(first * GRAN, n * GRAN)
        except Refused:
            assert touches_refuser
        else:
            assert not touches_refuser
            self.model |= set(range(first, first + n))
        for lst in self.registered:
            lst.refuse_next = False

    @rule(first=st.integers(0, NBLOCKS - 1), n=st.integers(1, 12))
    def discard(self, first: int, n: int) -> None:
        n = min(n, NBLOCKS - first)
        self.m.set_discarded(first * GRAN, n * GRAN)
        self.model -= set(range(first, first + n))

    @rule(
        target=listeners,
        start=st.integers(0, SIZE // ATOM - 1),
        length=st.integers(1, SIZE // ATOM),
        double=st.booleans(),
        refuse=st.booleans(),
    )
    def register(self, start: int, length: int, double: bool, refuse: bool) -> ModelListener:
        length = min(length, SIZE // ATOM - start)
        lst = ModelListener(double)
        section = MemoryRegionSection(self.mr, start * ATOM, length * ATOM, 0x4000_0000 + start * ATOM)
        lst.refuse_next = refuse
        expect_refusal = refuse and bool(self._populated_atoms() & ModelListener.atoms(section))
        try:
            self.m.register_listener(lst, section)
        except Refused:
            assert expect_refusal
            assert lst.view == set() and lst.section is None
            self.unregistered.append(lst)
        else:
            assert not expect_refusal
            lst.refuse_next = False
            self.registered.append(lst)
        return lst

    @rule(lst=consumes(listeners))
    def unregister(self, lst: ModelListener) -> None:
        if lst in self.registered:
            self.m.unregister_listener(lst)
            self.registered.remove(lst)
            self.unregistered.append(lst)

    @invariant()
    def provider_matches_model(self) -> None:
        if not hasattr(self, "m"):
            return
        runs: list[tuple[int, int]] = []
        self.m.replay_populated(
            MemoryRegionSection(self.mr, 0, SIZE), lambda s: runs.append((s.offset_within_region, s.end))
        )
        blocks = {b for s, e in runs for b in range(s // GRAN, e // GRAN)}
        assert blocks == self.model
        for (_, e1), (s2, _) in pairwise(runs):
            assert e1 < s2, "runs must be maximal and ascending"
        assert self.m.populated_size == len(self.model) * GRAN

    @invariant()
    def listener_views_match(self) -> None:
        if not hasattr(self, "m"):
            return
        populated = self._populated_atoms()
        for lst in self.registered:
            assert lst.section is not None
            assert lst.view == populated & ModelListener.atoms(lst.section)
        for lst in self.unregistered:
            assert lst.view == set() and lst.section is None


TestRdmStateful = RdmMachine.TestCase
