"""mlock pins measured in VmLck, with overlapping pins and faults; coverage model check."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard import faults
from ramdiscard.consumers.dma import MlockDmaBackend
from ramdiscard.consumers.dma.mlock import _Coverage
from ramdiscard.units import KiB, MiB
from tests.consumers.dma.conftest import Anon, status_kib


def test_pin_raises_vmlck_by_exactly_the_size(anon: Callable[..., Anon]) -> None:
    a = anon(8 * MiB)  # unpopulated: mlock populates
    lck0, pin0, rss0 = status_kib("VmLck"), status_kib("VmPin"), status_kib("RssAnon")
    with MlockDmaBackend() as b:
        h = b.pin(a.address, 8 * MiB)
        assert status_kib("VmLck") - lck0 == 8 * MiB // KiB
        assert status_kib("VmPin") == pin0
        assert status_kib("RssAnon") - rss0 >= 8 * MiB // KiB * 9 // 10
        b.unpin(h)
        assert status_kib("VmLck") == lck0


def test_overlapping_pins_keep_shared_pages_locked(anon: Callable[..., Anon]) -> None:
    a = anon(16 * MiB)
    lck0 = status_kib("VmLck")
    with MlockDmaBackend() as b:
        ha = b.pin(a.address, 8 * MiB)
        hb = b.pin(a.address + 4 * MiB, 8 * MiB)
        hc = b.pin(a.address + 4 * MiB, 8 * MiB)  # identical to hb
        assert status_kib("VmLck") - lck0 == 12 * MiB // KiB
        assert b.locked_ranges() == [(a.address, a.address + 12 * MiB)]
        b.unpin(ha)
        assert status_kib("VmLck") - lck0 == 8 * MiB // KiB
        b.unpin(hb)
        assert status_kib("VmLck") - lck0 == 8 * MiB // KiB
        b.unpin(hc)
        assert status_kib("VmLck") == lck0 and b.locked_ranges() == []


def test_discard_of_mlocked_memory_is_refused(anon: Callable[..., Anon]) -> None:
    a = anon(2 * MiB)
    a.fill(b"L")
    with MlockDmaBackend() as b:
        h = b.pin(a.address, 2 * MiB)
        with pytest.raises(OSError) as info:
            a.discard()
        assert info.value.errno == errno.EINVAL
        assert b.dma_read(h, 0, 2) == b"LL"


def test_failed_pin_unlocks_what_it_locked(anon: Callable[..., Anon]) -> None:
    a = anon(12 * MiB)
    lck0 = status_kib("VmLck")
    with MlockDmaBackend() as b:
        middle = b.pin(a.address + 4 * MiB, 4 * MiB)
        # The next pin needs two mlock calls (around the middle pin); fail the second.
        with faults.inject(faults.Op.MLOCK, nth=2), pytest.raises(faults.InjectedFault):
            b.pin(a.address, 12 * MiB)
        assert b.pin_count == 1 and b.pinned_bytes == 4 * MiB
        assert status_kib("VmLck") - lck0 == 4 * MiB // KiB
        b.unpin(middle)
        assert status_kib("VmLck") == lck0


def test_failed_unpin_then_retry(anon: Callable[..., Anon]) -> None:
    a = anon(12 * MiB)
    lck0 = status_kib("VmLck")
    with MlockDmaBackend() as b:
        middle = b.pin(a.address + 4 * MiB, 4 * MiB)
        outer = b.pin(a.address, 12 * MiB)
        b.unpin(middle)
        b2 = b.pin(a.address + 4 * MiB, 4 * MiB)
        with faults.inject(faults.Op.MUNLOCK, nth=2), pytest.raises(faults.InjectedFault):
            b.unpin(outer)
        assert b.pinned_bytes == 4 * MiB + 8 * MiB
        assert status_kib("VmLck") - lck0 == 8 * MiB // KiB
        b.unpin(outer)
        assert status_kib("VmLck") - lck0 == 4 * MiB // KiB
        b.unpin(b2)
        assert status_kib("VmLck") == lck0 and b.pinned_bytes == 0


def test_close_unlocks_everything_even_after_munmap() -> None:
    lck0 = status_kib("VmLck")
    b = MlockDmaBackend()
    m = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    keep = mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    b.pin(ctypes.addressof(ctypes.c_char.from_buffer(m)), 4 * MiB)
    b.pin(ctypes.addressof(ctypes.c_char.from_buffer(keep)), 4 * MiB)
    m.close()  # unmapping drops its lock; munlock of it fails with ENOMEM, handled
    b.close()
    assert status_kib("VmLck") == lck0
    keep.close()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 31), st.integers(1, 8), st.booleans()), min_size=1, max_size=30))
def test_coverage_matches_a_per_page_model(ops: list[tuple[int, int, bool]]) -> None:
    cov = _Coverage()
    model = [0] * 40
    for start, length, add in ops:
        end = start + length
        if not add and any(model[p] == 0 for p in range(start, end)):
            continue
        newly = cov.ranges_with(start, end, 0)
        assert sum(e - s for s, e in newly) == sum(model[p] == 0 for p in range(start, end))
        cov.add(start, end, 1 if add else -1)
        for p in range(start, end):
            model[p] += 1 if add else -1
        for p in range(40):
            assert cov.pieces(p, p + 1)[0][2] == model[p]
        assert len(cov._bounds) <= 2 * len(ops) + 2
    if not any(model):
        assert cov.is_empty()
