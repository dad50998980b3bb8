"""The trusted run-pin entry (``pin_run_checked``) and the io_uring ring's iovec paths
(``update_flat``, releases from the ring's preallocated empty iovecs): same pins, same
accounting and the same all-or-nothing rollback as the public, validating ``pin_run``."""

from __future__ import annotations

import ctypes
import mmap
from array import array
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ramdiscard import faults
from ramdiscard.consumers.dma import DmaBackend, IoUringDmaBackend, MlockDmaBackend, RawRing
from ramdiscard.consumers.dma.backend import BackendClosed
from ramdiscard.consumers.dma.runs import PinRun
from ramdiscard.errors import HostMemoryError
from ramdiscard.units import KiB
from tests.consumers.dma.conftest import IOURING_OK, IOURING_REASON, Anon, status_kib

PAGE = 4 * KiB
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(params=["iouring", "mlock"])
def backend(request: pytest.FixtureRequest) -> Iterator[DmaBackend]:
    if request.param == "iouring" and not IOURING_OK:
        pytest.skip(IOURING_REASON)
    b: DmaBackend = IoUringDmaBackend(slots_per_ring=8) if request.param == "iouring" else MlockDmaBackend()
    with b:
        yield b


def _key(backend: DmaBackend) -> str:
    return "VmPin" if isinstance(backend, IoUringDmaBackend) else "VmLck"


def _pieces(a: Anon, pages: list[int]) -> list[tuple[int, int]]:
    out, pos = [], a.address
    for n in pages:
        out.append((pos, n * PAGE))
        pos += n * PAGE
    return out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pages=st.lists(st.integers(1, 4), min_size=1, max_size=20), lo=st.integers(0, 20), hi=st.integers(0, 20)
)
def test_a_checked_run_pins_like_pin_run(
    backend: DmaBackend, anon: Callable[..., Anon], pages: list[int], lo: int, hi: int
) -> None:
    a = anon(sum(pages) * PAGE)
    for i, n in enumerate(pages):
        a.fill(bytes([65 + i]), sum(pages[:i]) * PAGE, n * PAGE)
    ranges = _pieces(a, pages)
    base = status_kib(_key(backend))
    run = backend.pin_run_checked(ranges)
    ranges.clear()  # the run keeps its own copy
    assert backend.pin_count == len(pages) and backend.pinned_bytes == sum(pages) * PAGE
    assert status_kib(_key(backend)) - base == sum(pages) * PAGE // KiB
    assert len(run) == len(pages) and run.ranges == _pieces(a, pages)
    last = len(pages) - 1
    assert backend.dma_read(backend.run_handle(run, last), 0, 1) == bytes([65 + last])
    lo, hi = sorted((min(lo, len(pages)), min(hi, len(pages))))
    backend.unpin_run(run, lo, hi)
    kept = pages[:lo] + pages[hi:]
    assert backend.pin_count == len(kept) and backend.pinned_bytes == sum(kept) * PAGE
    assert [backend.run_holds(run, i) for i in range(len(pages))] == [
        not lo <= i < hi for i in range(len(pages))
    ]
    backend.unpin_run(run, 0, len(pages))
    assert backend.pin_count == 0 and backend.pinned_bytes == 0 and status_kib(_key(backend)) == base


def test_a_checked_run_failing_part_way_pins_nothing(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(12 * PAGE)
    ranges = _pieces(a, [1] * 12)  # 12 pieces over 8-slot rings: two rings on io_uring
    base = status_kib(_key(backend))
    pin_op = faults.Op.PIN if isinstance(backend, IoUringDmaBackend) else faults.Op.MLOCK
    with faults.inject(pin_op, nth=10), pytest.raises(faults.InjectedFault):
        backend.pin_run_checked(ranges)
    assert backend.pin_count == 0 and backend.pinned_bytes == 0 and status_kib(_key(backend)) == base
    if isinstance(backend, IoUringDmaBackend):
        # The kernel refusing piece 9 (no access) after pinning the ones before it.
        assert _libc.mprotect(ctypes.c_void_p(a.address + 9 * PAGE), ctypes.c_size_t(PAGE), 0) == 0
        with pytest.raises(HostMemoryError):
            backend.pin_run_checked(ranges)
        assert backend.pin_count == 0 and backend.pinned_bytes == 0 and status_kib("VmPin") == base
        rw = mmap.PROT_READ | mmap.PROT_WRITE
        assert _libc.mprotect(ctypes.c_void_p(a.address + 9 * PAGE), ctypes.c_size_t(PAGE), rw) == 0
    run = backend.pin_run_checked(ranges)  # every slot the failures used is free again
    assert backend.pin_count == 12
    backend.close()
    assert status_kib(_key(backend)) == base and not backend.run_holds(run, 0)


def test_a_checked_run_on_a_closed_backend_or_of_nothing(backend: DmaBackend) -> None:
    empty = backend.pin_run_checked([])
    assert len(empty) == 0 and backend.pin_count == 0
    backend.close()
    with pytest.raises(BackendClosed):
        backend.pin_run_checked([(PAGE, PAGE)])


def test_update_flat_and_releases_from_the_empty_table(anon: Callable[..., Anon]) -> None:
    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    a = anon(6 * PAGE)
    base = status_kib("VmPin")
    flat = array("Q", [v for i in range(6) for v in (a.address + i * PAGE, PAGE)])
    with RawRing() as ring:
        ring.register_sparse(4)
        for start, count in ((-1, 1), (0, 0), (5, 2), (0, 7)):
            with pytest.raises(ValueError, match="outside"):
                ring.update_flat(0, flat, start, count)
        with pytest.raises(ValueError, match="outside"):
            ring.update_flat(0, array("L", [a.address, PAGE]), 0, 1)
        assert status_kib("VmPin") == base
        assert ring.update_flat(1, flat, 2, 3) == 3  # pairs 2..4 in slots 1..3
        assert status_kib("VmPin") - base == 3 * PAGE // KiB
        assert ring.release_many(1, 3) == 3
        assert status_kib("VmPin") == base
        with pytest.raises(HostMemoryError):
            ring.release_many(2, 3)  # past the 4-slot table
        with pytest.raises(HostMemoryError):
            ring.release_many(0, 5)  # more than the table: iovecs built for the call
        assert ring.update_flat(0, flat, 0, 4) == 4
        assert ring.release_many(0, 4) == 4
        assert status_kib("VmPin") == base


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("pin"), st.integers(1, 7)),
            st.tuples(st.just("unpin"), st.integers(0, 9), st.integers(0, 7), st.integers(0, 7)),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_run_pins_take_the_lowest_free_slots_of_the_lowest_rings(
    anon: Callable[..., Anon], ops: list[tuple[Any, ...]]
) -> None:
    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    slots = 4
    a = anon(64 * PAGE)
    base = status_kib("VmPin")
    used: set[tuple[int, int]] = set()  # the model: (ring, slot) in use
    runs: list[tuple[PinRun, list[tuple[int, int] | None]]] = []
    page = 0
    with IoUringDmaBackend(slots_per_ring=slots) as b:
        for op in ops:
            if op[0] == "pin":
                n = op[1]
                ranges = [(a.address + (page + i) % 64 * PAGE, PAGE) for i in range(n)]
                page += n
                free = [(r, s) for r in range(64) for s in range(slots) if (r, s) not in used][:n]
                used.update(free)
                where: list[tuple[int, int] | None] = list(free)
                runs.append((b.pin_run_checked(ranges), where))
            elif runs:
                run, where = runs[op[1] % len(runs)]
                lo, hi = sorted((op[2] % (len(where) + 1), op[3] % (len(where) + 1)))
                b.unpin_run(run, lo, hi)
                for i in range(lo, hi):
                    slot = where[i]
                    if slot is not None:
                        used.discard(slot)
                        where[i] = None
        assert b.pin_count == len(used)
        for run, where in runs:
            for i, slot in enumerate(where):
                if slot is not None:
                    (buf,) = b.buffers(b.run_handle(run, i))
                    assert (buf.ring, buf.slot) == slot
    assert status_kib("VmPin") == base
