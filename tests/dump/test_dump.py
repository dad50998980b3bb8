"""Guest memory dumps: ELF core with only populated memory, never populating anything."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.dump import dump_guest_memory, guest_phys_blocks
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, machines  # noqa: F401 - fixture
from tests.migration.machine import Machine


def _segments(path: str) -> list[tuple[int, int, bytes]]:
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert elf.header.e_type == "ET_CORE"
        return [
            (s.header.p_paddr, s.header.p_filesz, s.data())
            for s in elf.iter_segments()
            if s.header.p_type == "PT_LOAD"
        ]


def _expected(m: Machine, blocks: set[int] | list[int]) -> list[tuple[int, int]]:
    """The PT_LOAD segments a dump must have: the low RAM, then one per maximal run of the
    plugged ``blocks`` (computed from the blocks the test plugged, not from the device)."""
    out = []
    if m.low is not None:
        out.append((0, m.low.size))
    run: list[int] = []
    for b in sorted(blocks):
        if run and b != run[-1] + 1:
            out.append((m.dev.addr + run[0] * m.block, len(run) * m.block))
            run = []
        run.append(b)
    if run:
        out.append((m.dev.addr + run[0] * m.block, len(run) * m.block))
    return out


@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_dump_matches_guest_memory(machines: Machines, backing: str, tmp_path: object) -> None:  # noqa: F811
    m = machines(backing=backing)
    blocks = [0, 1, 4, 9, 10, 11, 31]
    m.plug_blocks(blocks)
    m.fill(6)
    resident = m.ram.resident_bytes()
    path = f"{tmp_path}/core"
    info = dump_guest_memory(m.space, path)
    segs = _segments(path)
    assert [(p, n) for p, n, _d in segs] == _expected(m, blocks)
    for paddr, size, data in segs:
        if paddr < m.dev.addr:
            assert m.low is not None and data == m.low.view[:size]
        else:
            off = paddr - m.dev.addr
            assert data == m.ram.view[off : off + size]
    assert m.low is not None
    assert info.bytes == len(blocks) * m.block + m.low.size
    # Nothing was populated by the dump, and the device is not left busy.
    assert m.ram.resident_bytes() == resident
    assert m.resident_outside_plugged() == 0
    assert m.dev.plug(m.dev.addr + 20 * m.block, 1) is ResponseType.ACK


def test_readelf_lists_the_segments(machines: Machines, tmp_path: object) -> None:  # noqa: F811
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("binutils readelf is not installed")
    m = machines(low=0)
    m.plug_blocks([2, 3, 7])
    path = f"{tmp_path}/core"
    dump_guest_memory(m.space, path)
    out = subprocess.run([readelf, "-l", "-W", path], capture_output=True, text=True, check=True).stdout
    assert "Elf file type is CORE" in out
    loads = [line.split() for line in out.splitlines() if line.strip().startswith("LOAD")]
    assert [(int(f[3], 16), int(f[4], 16)) for f in loads] == [
        (m.dev.addr + 2 * m.block, 2 * m.block),
        (m.dev.addr + 7 * m.block, m.block),
    ]


def test_runs_never_merged_across_regions(tmp_path: object) -> None:
    """Two RAM regions adjacent in guest-physical memory stay two segments."""
    a, b = RamBlock(2 * MiB), RamBlock(2 * MiB)
    try:
        root = MemoryRegion.new_container("system", 4 * MiB)
        root.add_subregion(0, MemoryRegion.new_ram("a", a))
        root.add_subregion(2 * MiB, MemoryRegion.new_ram("b", b))
        from ramdiscard.memory import AddressSpace

        space = AddressSpace("system", root)
        blocks = guest_phys_blocks(space)
        assert [(x.gpa, x.size, x.mr.name) for x in blocks] == [(0, 2 * MiB, "a"), (2 * MiB, 2 * MiB, "b")]
        path = f"{tmp_path}/core"
        dump_guest_memory(space, path)
        assert len(_segments(path)) == 2
        for sub in root.subregions:
            root.del_subregion(sub)
        space.destroy()
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def hyp_machine() -> Iterator[Machine]:
    ms = Machines()
    yield ms(32 * MiB, backing="memfd", low=0, dynamic=True)
    ms.close()


@settings(max_examples=25, deadline=None)
@given(blocks=st.sets(st.integers(0, 15)))
def test_dump_segments_are_the_plugged_runs(
    hyp_machine: Machine, blocks: set[int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    m = hyp_machine
    m.dev.unplug_all()
    m.plug_blocks(blocks)
    path = str(tmp_path_factory.mktemp("dump") / "core")
    dump_guest_memory(m.space, path)
    assert [(p, n) for p, n, _d in _segments(path)] == _expected(m, blocks)
    assert m.resident_outside_plugged() == 0
