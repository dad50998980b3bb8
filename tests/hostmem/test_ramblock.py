"""RamBlock on every backing: memory really comes and goes, data survives where it must,
bad calls change nothing, and nothing leaks."""

from __future__ import annotations

import errno
import gc
import hashlib
import os
from pathlib import Path

import pytest

from ramdiscard import faults
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.faults import InjectedFault, Op
from ramdiscard.hostmem import (
    Backing,
    RamBlock,
    mapping_count,
    open_fd_count,
    proc_status,
    thp_size,
)
from ramdiscard.hostmem import ramblock as ramblock_mod
from ramdiscard.units import GiB, KiB, MiB, TiB

from .conftest import BlockFactory, Kind, counter

# RssAnon also counts the interpreter's heap. Between two snapshots taken a few lines
# apart the heap moves by a few pages at most (malloc arenas grow in 4 KiB pages and
# nothing here allocates more than a few KiB of Python objects), so 64 pages is a
# generous bound that is still 1/256 of the 64 MiB being measured. Shmem and hugetlb are
# never used by the interpreter: their counters must match exactly.
ANON_SLACK = 64 * 4 * KiB


def slack(kind: Kind) -> int:
    return ANON_SLACK if kind.counter == "rss_anon" else 0


def digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fill(block: RamBlock) -> None:
    """A pattern that differs in every 4 KiB page (and every huge page)."""
    page = bytes(range(256)) * 16
    for off in range(0, block.size, 4 * KiB):
        block.view[off : off + 8] = (off // (4 * KiB)).to_bytes(8, "little")
        block.view[off + 8 : off + 4 * KiB] = page[8:]


# ---- memory comes and goes -------------------------------------------------------------


def test_populate_then_discard_returns_to_baseline(kind: Kind, make_block: BlockFactory) -> None:
    size = 32 * MiB if kind.hugetlb else 64 * MiB
    block = make_block(size)
    assert block.resident_bytes() == 0
    proc_status()  # warm the code path so its own allocations are not measured
    before = counter(kind)
    block.populate(0, size)
    assert block.resident_bytes() == size
    grown = counter(kind) - before
    assert size - slack(kind) <= grown <= size + slack(kind)

    block.discard_range(0, size)
    assert block.resident_bytes() == 0
    assert abs(counter(kind) - before) <= slack(kind)


def test_discard_zeroes_the_range_and_keeps_the_rest(kind: Kind, make_block: BlockFactory) -> None:
    size = 16 * MiB
    block = make_block(size)
    fill(block)
    page = block.page_size
    # a range starting and ending mid-block, a few pages long, page aligned
    start, length = 3 * page, 2 * page if kind.hugetlb else 37 * page
    head = digest(block.view[:start])
    tail = digest(block.view[start + length :])
    resident_before = block.resident_bytes()

    block.discard_range(start, length)

    assert block.resident_bytes(start, length) == 0
    assert block.resident_bytes() == resident_before - length
    assert block.read(start, length) == bytes(length)
    assert digest(block.view[:start]) == head
    assert digest(block.view[start + length :]) == tail


def test_write_read_roundtrip_and_discard_of_part(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(8 * MiB)
    block.write(5, b"hello")
    block.write(block.size - 3, b"end")
    assert block.read(5, 5) == b"hello"
    assert block.read(block.size - 3, 3) == b"end"
    block.discard_range(0, block.page_size)
    assert block.read(0, 16) == bytes(16)
    assert block.read(block.size - 3, 3) == b"end"


def test_populate_read_then_write_keeps_data(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(8 * MiB)
    block.write(0, b"x" * 100)
    block.populate(0, block.size, write=False)
    block.populate(0, block.size, write=True)
    assert block.read(0, 100) == b"x" * 100
    assert block.resident_bytes() == block.size


def test_populate_fallback_touches_pages(
    kind: Kind, make_block: BlockFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kernels without MADV_POPULATE_* (< 5.14) get one touch per page instead."""
    # what an old kernel does: unknown advice values fail with EINVAL
    monkeypatch.setattr(ramblock_mod, "_MADV_POPULATE_WRITE", 99)
    monkeypatch.setattr(ramblock_mod, "_MADV_POPULATE_READ", 98)
    monkeypatch.setattr(ramblock_mod, "_populate_supported", False)
    block = make_block(8 * MiB)
    block.write(block.page_size + 1, b"keep")
    block.populate(0, block.size)
    assert block.resident_bytes() == block.size
    assert block.read(block.page_size + 1, 4) == b"keep"
    block.discard_range(0, block.size)
    block.populate(0, block.size, write=False)
    assert block.read(0, block.size) == bytes(block.size)


def test_discard_of_untouched_memory_is_harmless(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(8 * MiB)
    block.discard_range(0, block.size)
    block.discard_range(0, block.size)
    assert block.resident_bytes() == 0
    for offset in (0, block.page_size, block.size):  # zero lengths are no-ops, even at the end
        block.discard_range(offset, 0)
        block.populate(offset, 0)
        block.populate(offset, 0, write=False)
    assert block.resident_bytes() == 0
    with pytest.raises(InvalidArgument):
        block.discard_range(block.size + block.page_size, 0)


def test_thp_block_gets_huge_pages() -> None:
    """With thp=True (and the kernel's THP mode allowing it) populate takes huge pages."""
    with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
        mode = f.read()
    if "[never]" in mode:
        pytest.skip("THP disabled on this host")
    huge = thp_size()
    with RamBlock(8 * huge, thp=True) as block:
        block.populate(0, block.size)
        anon_huge = _anon_huge_bytes(block.host_address, block.size)
        # Every huge-aligned stretch of the block is huge pages; only unaligned ends are not.
        first = -(-block.host_address // huge) * huge
        last = (block.host_address + block.size) // huge * huge
        assert anon_huge % huge == 0 and last - first <= anon_huge <= block.size
    with RamBlock(8 * huge, thp=False) as block:
        block.populate(0, block.size)
        assert _anon_huge_bytes(block.host_address, block.size) == 0


def _anon_huge_bytes(address: int, size: int) -> int:
    """AnonHugePages of the mapping containing ``address`` (from /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as f:
        for line in f:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):
                lo, hi = (int(x, 16) for x in first.split("-"))
                inside = lo <= address < hi
            elif inside and first == "AnonHugePages:":
                return int(line.split()[1]) * KiB
    raise AssertionError("mapping not found in smaps")


def test_sparse_terabyte_block() -> None:
    """A 1 TiB anonymous block is creatable on a 24 GiB host and touchable anywhere."""
    before = proc_status().vm_rss
    with RamBlock(TiB) as block:
        offsets = [0, 37 * GiB + 4 * KiB, TiB // 2, TiB - 4 * KiB]
        for off in offsets:
            block.write(off + 1, b"T")
        for off in offsets:
            assert block.read(off, 2) == b"\0T"
        resident = block.resident_bytes()
        # each touch faults at most one THP
        assert 4 * 4 * KiB <= resident <= 4 * thp_size()
        assert proc_status().vm_rss - before <= 4 * thp_size() + ANON_SLACK
        block.discard_range(TiB // 2, TiB // 2)
        assert block.read(TiB - 4 * KiB + 1, 1) == b"\0"
        assert block.read(1, 1) == b"T"


# ---- bad calls change nothing ----------------------------------------------------------


def _bad_ranges(block: RamBlock) -> list[tuple[int, int]]:
    page, size = block.page_size, block.size
    return [
        (1, page),  # unaligned offset
        (0, page + 512),  # unaligned length
        (page // 2, page // 2),
        (-page, page),  # negative offset
        (0, -page),  # negative length
        (size, page),  # starts at the end
        (size - page, 2 * page),  # runs past the end
        (page, size),  # runs past the end by one page
        (page, 2**64 - page),  # would wrap a 64-bit end
        (2**64 - page, 2 * page),
    ]


def test_bad_ranges_raise_and_change_nothing(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(8 * MiB)
    fill(block)
    before, resident = digest(block.view), block.resident_bytes()
    for offset, length in _bad_ranges(block):
        for op in (block.discard_range, block.populate):
            with pytest.raises(InvalidArgument) as info:
                op(offset, length)
            assert isinstance(info.value, ValueError)
            assert f"[{offset:#x}, {offset + length:#x})" in str(info.value)
    with pytest.raises(InvalidArgument):
        block.read(block.size - 1, 2)
    with pytest.raises(InvalidArgument):
        block.write(block.size, b"x")
    with pytest.raises(InvalidArgument):
        block.resident_bytes(1, 4 * KiB)
    assert digest(block.view) == before
    assert block.resident_bytes() == resident


def test_closed_block_rejects_everything(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(4 * MiB)
    block.close()
    assert block.closed
    block.close()  # idempotent
    for call in (
        lambda: block.discard_range(0, block.page_size),
        lambda: block.populate(0, block.page_size),
        lambda: block.read(0, 1),
        lambda: block.write(0, b"x"),
        lambda: block.resident_bytes(),
        lambda: block.resize(block.page_size),
        lambda: block.view,
        lambda: block.host_address,
    ):
        with pytest.raises(InvalidArgument, match="closed"):
            call()
    assert block.fd is None


def test_injected_faults_change_nothing(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(4 * MiB)
    fill(block)
    before, resident = digest(block.view), block.resident_bytes()
    with faults.inject(Op.DISCARD) as plan, pytest.raises(InjectedFault):
        block.discard_range(0, block.size)
    assert plan.fired == 1
    assert digest(block.view) == before
    assert block.resident_bytes() == resident
    block.discard_range(0, block.size)
    with faults.inject(Op.POPULATE, errno=errno.ENOMEM), pytest.raises(InjectedFault):
        block.populate(0, block.size)
    assert block.resident_bytes() == 0


def test_mmap_failure_leaks_nothing(kind: Kind, make_block: BlockFactory) -> None:
    make_block(4 * MiB).close()  # creates any scratch file so it is not counted as a leak
    fds, maps = open_fd_count(), mapping_count()
    with faults.inject(Op.MMAP), pytest.raises(InjectedFault):
        make_block(4 * MiB)
    gc.collect()
    assert open_fd_count() == fds
    assert mapping_count() == maps


def test_invalid_construction() -> None:
    with pytest.raises(InvalidArgument, match="backing"):
        RamBlock(MiB, "swap")
    with pytest.raises(InvalidArgument, match="path"):
        RamBlock(MiB, "file")
    with pytest.raises(InvalidArgument, match="path"):
        RamBlock(MiB, "memfd", path="/dev/shm/x")
    with pytest.raises(InvalidArgument, match="readonly"):
        RamBlock(MiB, readonly=True)
    with pytest.raises(InvalidArgument, match="hugetlb"):
        RamBlock(MiB, hugepages=True)
    with pytest.raises(InvalidArgument, match="multiples"):
        RamBlock(MiB + 1)
    with pytest.raises(InvalidArgument):
        RamBlock(0)
    with pytest.raises(InvalidArgument):
        RamBlock(2 * MiB, max_size=MiB)
    assert RamBlock(MiB, Backing.MEMFD).backing is Backing.MEMFD


def test_hugepages_on_tmpfs_refused(shm_dir: Path) -> None:
    fds = open_fd_count()
    with pytest.raises(InvalidArgument, match="hugetlbfs"):
        RamBlock(2 * MiB, "file", path=shm_dir / "f", hugepages=True)
    assert open_fd_count() == fds


# ---- read-only files -------------------------------------------------------------------


def test_readonly_file_refuses_changes(shm_dir: Path) -> None:
    path = shm_dir / "image"
    content = os.urandom(64 * KiB) * 16  # 1 MiB
    path.write_bytes(content)
    with RamBlock(len(content), "file", path=path, readonly=True) as block:
        assert block.readonly and block.view.readonly
        with pytest.raises(HostMemoryError) as info:
            block.discard_range(4 * KiB, 8 * KiB)
        assert info.value.errno == errno.EROFS
        assert "[0x1000, 0x3000)" in str(info.value)
        with pytest.raises(HostMemoryError, match="read-only"):
            block.populate(0, 4 * KiB)
        with pytest.raises(HostMemoryError, match="read-only"):
            block.write(0, b"x")
        block.populate(0, block.size, write=False)
        assert block.read(0, block.size) == content
    assert path.read_bytes() == content


def test_readonly_file_too_small(shm_dir: Path) -> None:
    path = shm_dir / "small"
    path.write_bytes(b"x" * 4096)
    fds = open_fd_count()
    with pytest.raises(InvalidArgument, match="read-only"):
        RamBlock(8 * KiB, "file", path=path, readonly=True)
    assert open_fd_count() == fds


def test_file_keeps_size_and_data_after_close(shm_dir: Path) -> None:
    path = shm_dir / "persist"
    with RamBlock(MiB, "file", path=path) as block:
        block.write(0, b"persist")
        block.discard_range(4 * KiB, 4 * KiB)
    assert path.stat().st_size == MiB
    assert path.read_bytes()[:7] == b"persist"
    with RamBlock(MiB, "file", path=path) as again:
        assert again.read(0, 7) == b"persist"


# ---- resize ----------------------------------------------------------------------------


def test_resize_within_max_size(kind: Kind, make_block: BlockFactory) -> None:
    page = 2 * MiB if kind.hugetlb else 4 * KiB
    block = make_block(8 * MiB, max_size=16 * MiB)
    calls: list[tuple[int, int]] = []
    block.resize_hooks.append(lambda b, old, new: calls.append((old, new)))
    assert block.max_size == 16 * MiB and block.page_size == page
    block.write(block.size - 4, b"tail")
    old_view = block.view

    block.resize(4 * MiB)
    assert block.size == 4 * MiB and len(block.view) == 4 * MiB
    assert calls == [(8 * MiB, 4 * MiB)]
    with pytest.raises(ValueError):
        old_view[0]  # the block's own view was released
    assert block.resident_bytes() <= 4 * MiB

    block.resize(16 * MiB)
    assert block.read(8 * MiB - 4, 4) == bytes(4)  # the shrink discarded the old tail
    assert calls[-1] == (4 * MiB, 16 * MiB)
    block.discard_range(12 * MiB, 4 * MiB)
    for bad in (0, 32 * MiB, 16 * MiB + page, page + 1):
        with pytest.raises(InvalidArgument):
            block.resize(bad)
    assert block.size == 16 * MiB


# ---- nothing leaks ---------------------------------------------------------------------


def test_close_releases_fds_and_mappings(kind: Kind, make_block: BlockFactory) -> None:
    make_block(4 * MiB).close()
    gc.collect()
    fds, maps = open_fd_count(), mapping_count()
    for _ in range(3):
        with make_block(4 * MiB) as block:
            block.populate(0, block.size)
            assert block.host_address != 0
            _ = block.view[0]
    gc.collect()
    assert open_fd_count() == fds
    assert mapping_count() == maps


def test_close_with_derived_views_alive(kind: Kind, make_block: BlockFactory) -> None:
    make_block(4 * MiB).close()
    gc.collect()
    fds, maps = open_fd_count(), mapping_count()
    block = make_block(4 * MiB)
    block.write(0, b"alive")
    own = block.view
    derived = block.view[:16]
    block.close()
    assert block.closed and block.fd is None
    with pytest.raises(ValueError):
        own[0]
    # the derived view keeps the mapping, so it stays valid...
    assert bytes(derived[:5]) == b"alive"
    assert mapping_count() == maps + 1
    derived.release()
    # ...and releasing it unmaps it
    gc.collect()
    assert mapping_count() == maps
    assert open_fd_count() == fds


def test_unclosed_block_is_freed_by_gc(kind: Kind, make_block: BlockFactory, scratch_dir: Path) -> None:
    make_block(4 * MiB).close()
    gc.collect()
    fds, maps = open_fd_count(), mapping_count()
    block = RamBlock(4 * MiB, **kind.kwargs(scratch_dir))
    block.populate(0, block.size)
    del block
    gc.collect()
    assert open_fd_count() == fds
    assert mapping_count() == maps


def test_repr_and_properties(kind: Kind, make_block: BlockFactory) -> None:
    block = make_block(4 * MiB, name="guest-ram")
    assert "guest-ram" in repr(block)
    assert block.name == "guest-ram"
    assert block.backing == kind.backing
    assert block.hugetlb == kind.hugetlb
    assert (block.fd is None) == (kind.backing == "anonymous")
    assert (block.path is not None) == kind.on_file
    block.close()
    assert "closed" in repr(block)
