"""RealGuest refuses a bad guest RAM size or consumer with the scenario reader's wording,
before it looks for QEMU or starts anything."""

from __future__ import annotations

import pytest

from ramdiscard.machine.scenario.realguest import guest_ram_problem
from ramdiscard.realguest.launcher import RealGuest, RealGuestError
from ramdiscard.units import GiB, MiB


@pytest.mark.parametrize("ram", [128 * MiB, 300 * MiB, 2 * GiB + 128 * MiB])
def test_a_bad_ram_size_is_refused_as_the_reader_refuses_it(ram: int) -> None:
    problem = guest_ram_problem(ram)
    assert problem is not None
    with pytest.raises(RealGuestError) as info:
        RealGuest(ram_size=ram, qemu=None)
    assert str(info.value) == f"guest RAM {problem}, got {ram:#x}"


@pytest.mark.parametrize("ram", [256 * MiB, 1 * GiB, 2 * GiB])
def test_the_reader_accepts_the_launchers_range(ram: int) -> None:
    assert guest_ram_problem(ram) is None


def test_an_unknown_consumer_is_refused_before_anything_starts() -> None:
    with pytest.raises(RealGuestError, match="unknown real-guest consumer 'kvm' \\(known: vfio\\)"):
        RealGuest(consumers=("vfio", "kvm"))
