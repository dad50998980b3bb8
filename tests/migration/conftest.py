"""Fixtures for migration tests: machines on real host memory, closed at teardown."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ramdiscard.memory import MemoryRegionSection
from ramdiscard.rdm import RamDiscardListener
from tests.migration.machine import Machine


class Machines:
    def __init__(self) -> None:
        self.made: list[Machine] = []

    def __call__(self, *args: Any, **kw: Any) -> Machine:
        m = Machine(*args, **kw)
        self.made.append(m)
        return m

    def close(self) -> None:
        for m in reversed(self.made):
            m.close()


@pytest.fixture
def machines() -> Iterator[Machines]:
    ms = Machines()
    yield ms
    ms.close()


@pytest.fixture(params=["anonymous", "memfd"])
def backing(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class PinningListener(RamDiscardListener):
    """Stands in for a vfio container: keeps the exact set of populated bytes it was told
    about; a duplicate populate or a discard of something unknown fails the test."""

    def __init__(self) -> None:
        self.ranges: set[tuple[int, int]] = set()
        self.pages: set[int] = set()

    def notify_populate(self, section: MemoryRegionSection) -> None:
        new = set(range(section.offset_within_region >> 12, section.end >> 12))
        assert not new & self.pages, f"duplicate populate {section!r}"
        self.pages |= new

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.pages -= set(range(section.offset_within_region >> 12, section.end >> 12))


def attach_listener(m: Machine) -> PinningListener:
    rdl = PinningListener()
    m.dev.register_listener(rdl, MemoryRegionSection(m.mr, 0, m.mr.size, m.dev.addr))
    return rdl


def plugged_pages(m: Machine) -> set[int]:
    out: set[int] = set()
    for start, size in m.dev.plugged_ranges():
        out |= set(range(start >> 12, (start + size) >> 12))
    return out


def assert_fresh(m: Machine, requested: int | None = None) -> None:
    """The destination looks exactly like a fresh one: nothing plugged or resident, sizes
    as configured, not busy."""
    assert m.dev.plugged_size == 0
    assert m.dev.requested_size == (m.dev.region_size if requested is None else requested)
    assert m.ram.resident_bytes() == 0
    if m.low is not None:
        assert m.low.resident_bytes() == 0
    assert not m.dev.is_busy()
    assert m.dev.mapped_memslots == 0
