"""Random populate/discard/write/read sequences against a model of content and residency.

After every step:

* the block's bytes equal the model's (read through the fd for file-like backings, which
  does not fault pages in; through the mapping for anonymous memory at chosen moments,
  because reading a hole there maps the zero page);
* every page the model says *must* be resident (populated or written, not discarded since)
  is resident, and every resident page is one the model says *may* be resident;
* a discarded range is not resident right after the discard and reads zeros.

For THP blocks one access can fault in the whole 2 MiB huge page, and khugepaged may
collapse a partly populated 2 MiB range, so "may" is tracked and checked per 2 MiB.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramdiscard.hostmem import RamBlock, syscalls, thp_size
from ramdiscard.units import KiB

from .conftest import Kind

PAGES = {"anon_thp": 1024, "anon_4k": 64, "memfd": 64, "file_shm": 64, "memfd_hugetlb": 4}
MODEL_KINDS = ["anon_thp", "anon_4k", "memfd", "file_shm", "memfd_hugetlb"]


@dataclass
class Model:
    block: RamBlock
    content: bytearray
    must: set[int] = field(default_factory=set)  # block pages that must be resident
    may: set[int] = field(default_factory=set)  # regions (pages, or THP ranges) that may be

    def __post_init__(self) -> None:
        b = self.block
        self.page = b.page_size
        self.npages = b.size // self.page
        self.region_bytes = thp_size() if b.thp else self.page

    def region(self, page: int) -> int:
        return (self.block.host_address + page * self.page) // self.region_bytes

    def touched(self, first: int, count: int, *, resident: bool) -> None:
        for p in range(first, first + count):
            self.may.add(self.region(p))
            if resident:
                self.must.add(p)

    def resident_pages(self) -> set[int]:
        vec = syscalls.mincore(self.block.host_address, self.block.size)
        per = self.page // mmap.PAGESIZE
        return {p for p in range(self.npages) if any(vec[p * per : (p + 1) * per])}

    def check_residency(self) -> None:
        resident = self.resident_pages()
        assert self.must <= resident, f"lost pages {sorted(self.must - resident)[:8]}"
        stray = {p for p in resident if self.region(p) not in self.may}
        assert not stray, f"resident but never touched: {sorted(stray)[:8]}"

    def check_content(self, *, through_mapping: bool) -> None:
        b = self.block
        if b.fd is not None:
            assert os.pread(b.fd, b.size, 0) == self.content
        elif through_mapping:
            assert b.view == self.content
            self.touched(0, self.npages, resident=False)


page_ranges = st.tuples(st.integers(0, 1023), st.integers(0, 1023))
steps = st.lists(
    st.one_of(
        st.tuples(st.just("populate"), page_ranges, st.booleans()),
        st.tuples(st.just("discard"), page_ranges, st.just(False)),
        st.tuples(st.just("write"), page_ranges, st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("read"), page_ranges, st.just(False)),
    ),
    max_size=25,
)


@pytest.mark.parametrize("kind_id", MODEL_KINDS)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=steps)
def test_random_sequences_match_model(
    kind_id: str, ops: list[tuple[str, tuple[int, int], object]], request: pytest.FixtureRequest
) -> None:
    from .conftest import KINDS

    kind: Kind = next(k for k in KINDS if k.id == kind_id)
    if kind.hugetlb:
        request.getfixturevalue("hugetlb_pool")
    scratch: Path = request.getfixturevalue("shm_dir")
    npages = PAGES[kind_id]
    page = 2 * 1024 * KiB if kind.hugetlb else 4 * KiB
    with RamBlock(npages * page, **kind.kwargs(scratch)) as block:
        model = Model(block, bytearray(block.size))
        for op, (a, b), arg in ops:
            first = a % npages
            count = b % (npages - first) + 1
            off, length = first * page, count * page
            if op == "populate":
                block.populate(off, length, write=bool(arg))
                model.touched(first, count, resident=True)
            elif op == "discard":
                block.discard_range(off, length)
                model.content[off : off + length] = bytes(length)
                model.must -= set(range(first, first + count))
                assert not model.resident_pages() & set(range(first, first + count))
                assert block.read(off, length) == bytes(length)
                # the read mapped zero pages (anonymous) or allocated them (hugetlb)
                model.touched(first, count, resident=kind.hugetlb)
                if block.fd is not None and not kind.hugetlb:
                    # shmem read faults allocate pages: give the memory back again
                    block.discard_range(off, length)
                    model.may -= {model.region(p) for p in range(first, first + count)}
            elif op == "write":
                assert isinstance(arg, bytes)
                data = arg[: block.size - (off + page // 3)]
                start = off + page // 3
                block.write(start, data)
                model.content[start : start + len(data)] = data
                last = (start + len(data) - 1) // page
                model.touched(start // page, last - start // page + 1, resident=True)
            else:
                assert block.read(off, length) == model.content[off : off + length]
                model.touched(first, count, resident=kind.hugetlb)
            model.check_residency()
            model.check_content(through_mapping=False)
        model.check_content(through_mapping=True)
        model.check_residency()
