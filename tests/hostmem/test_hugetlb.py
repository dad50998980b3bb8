"""Hugetlb blocks with an exhausted pool: populate fails cleanly, discard gives back."""

from __future__ import annotations

import errno

import pytest

from ramdiscard.errors import HostMemoryError
from ramdiscard.hostmem import RamBlock, hugepage_pool, proc_status
from ramdiscard.units import MiB


@pytest.mark.parametrize("on_file", [False, True], ids=["memfd", "hugetlbfs"])
def test_exhausted_pool_populate_fails_and_discard_restores(
    hugetlb_pool: int, request: pytest.FixtureRequest, on_file: bool
) -> None:
    pool = hugepage_pool()
    page = pool.page_size
    pages = pool.free + 4  # more than the pool can give
    if on_file:
        directory = request.getfixturevalue("hugetlbfs_dir")
        block = RamBlock(pages * page, "file", path=directory / "exhaust")
    else:
        block = RamBlock(pages * page, "memfd", hugepages=True)
    with block:
        assert block.page_size == page and block.hugetlb
        # mapping reserves nothing (MAP_NORESERVE): the pool is untouched
        assert hugepage_pool().free == pool.free
        block.write(0, b"first page")
        with pytest.raises(HostMemoryError) as info:
            block.populate(0, block.size)
        err = info.value
        assert err.errno in (errno.EFAULT, errno.ENOMEM)
        assert f"[0x0, {block.size:#x})" in str(err)
        assert "exhausted" in str(err) and "MADV_POPULATE_WRITE" in str(err)
        # partial population: the pool is used up, the rest of the block is not populated
        assert hugepage_pool().free == 0
        assert block.resident_bytes() == pool.free * page
        assert proc_status().hugetlb == pool.free * page
        # plain access to an unpopulated page would be SIGBUS; read() turns it into an error
        with pytest.raises(HostMemoryError):
            block.read(block.size - 1, 1)

        block.discard_range(0, block.size)
        assert hugepage_pool().free == pool.free
        assert block.resident_bytes() == 0
        assert block.read(0, 10) == bytes(10)
        block.discard_range(0, page)
    assert hugepage_pool().free == pool.free


def test_hugetlb_granularity_enforced(hugetlb_pool: int) -> None:
    with RamBlock(8 * MiB, "memfd", hugepages=True) as block:
        assert block.page_size == 2 * MiB
        block.populate(2 * MiB, 2 * MiB)
        for bad in ((4096, 2 * MiB), (0, 4096), (MiB, MiB)):
            with pytest.raises(ValueError, match="page size 0x200000"):
                block.discard_range(*bad)
        assert block.resident_bytes() == 2 * MiB
