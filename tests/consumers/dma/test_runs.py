"""Run pins (pin_run / unpin_run / run_handle / run_holds): real pins counted in VmPin,
released in spans, piece handles on demand, failures part way, foreign runs refused; on
io_uring (one record per run of slots) and on a backend that keeps one handle per piece."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ramdiscard import faults
from ramdiscard.consumers.dma import DmaBackend, IoUringDmaBackend, MlockDmaBackend
from ramdiscard.errors import InvalidArgument
from ramdiscard.units import KiB, MiB
from tests.consumers.dma.conftest import IOURING_OK, IOURING_REASON, Anon, status_kib

PIECE = 64 * KiB
N = 8


def _iouring() -> DmaBackend:
    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    return IoUringDmaBackend()


@pytest.fixture(params=["iouring", "mlock"])
def backend(request: pytest.FixtureRequest) -> Iterator[DmaBackend]:
    b = _iouring() if request.param == "iouring" else MlockDmaBackend()
    with b:
        yield b


def _ops(backend: DmaBackend) -> tuple[faults.Op, faults.Op]:
    """The (pin, unpin) fault points of the backend."""
    if isinstance(backend, IoUringDmaBackend):
        return faults.Op.PIN, faults.Op.UNPIN
    return faults.Op.MLOCK, faults.Op.MUNLOCK


def _ranges(a: Anon) -> list[tuple[int, int]]:
    return [(a.address + i * PIECE, PIECE) for i in range(N)]


def test_a_run_is_n_pins_and_a_span_release_returns_vmpin(
    backend: DmaBackend, anon: Callable[..., Anon]
) -> None:
    a = anon(N * PIECE)
    a.fill(b"q")
    key = "VmPin" if isinstance(backend, IoUringDmaBackend) else "VmLck"
    base = status_kib(key)
    run = backend.pin_run(_ranges(a))
    assert backend.pin_count == N and backend.pinned_bytes == N * PIECE
    assert status_kib(key) - base == N * PIECE // KiB
    backend.unpin_run(run, 2, 5)
    assert [backend.run_holds(run, i) for i in range(N)] == [True] * 2 + [False] * 3 + [True] * 3
    assert backend.pin_count == N - 3 and status_kib(key) - base == (N - 3) * PIECE // KiB
    backend.unpin_run(run, 0, N)  # released pieces in the span are skipped
    assert backend.pin_count == 0 and backend.pinned_bytes == 0 and status_kib(key) == base


def test_a_piece_handle_reads_and_is_released_by_the_run(
    backend: DmaBackend, anon: Callable[..., Anon]
) -> None:
    a = anon(N * PIECE)
    a.fill(b"r")
    a.fill(b"s", 3 * PIECE, PIECE)
    run = backend.pin_run(_ranges(a))
    h = backend.run_handle(run, 3)
    assert (h.host_address, h.size) == (a.address + 3 * PIECE, PIECE)
    assert backend.run_handle(run, 3) is h and backend.holds(h)
    assert backend.dma_read(h, 0, 2) == b"ss"
    assert backend.pin_count == N and len(backend.handles()) == N
    backend.unpin_run(run, 0, N)
    assert not backend.holds(h) and backend.pin_count == 0 and backend.pinned_bytes == 0
    with pytest.raises(InvalidArgument, match="released"):
        backend.run_handle(run, 3)


def test_unpinning_a_piece_handle_alone_then_the_run(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(N * PIECE)
    run = backend.pin_run(_ranges(a))
    backend.unpin(backend.run_handle(run, 0))
    assert not backend.run_holds(run, 0) and backend.pin_count == N - 1
    backend.unpin_run(run, 0, N)
    assert backend.pin_count == 0 and backend.pinned_bytes == 0


def test_a_failing_release_keeps_the_rest_pinned_and_a_retry_finishes(
    backend: DmaBackend, anon: Callable[..., Anon]
) -> None:
    a = anon(N * PIECE)
    run = backend.pin_run(_ranges(a))
    with faults.inject(_ops(backend)[1], nth=3), pytest.raises(faults.InjectedFault):
        backend.unpin_run(run, 1, 7)
    assert [backend.run_holds(run, i) for i in range(N)] == [True, False, False] + [True] * 5
    assert backend.pin_count == N - 2 and backend.pinned_bytes == (N - 2) * PIECE
    backend.unpin_run(run, 0, N)
    assert backend.pin_count == 0 and backend.pinned_bytes == 0


def test_a_failing_pin_run_pins_nothing(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(N * PIECE)
    with faults.inject(_ops(backend)[0], nth=N), pytest.raises(faults.InjectedFault):
        backend.pin_run(_ranges(a))
    assert backend.pin_count == 0 and backend.pinned_bytes == 0
    with pytest.raises(InvalidArgument):
        backend.pin_run([(a.address, PIECE), (a.address + 1, PIECE)])
    assert backend.pin_count == 0


def test_foreign_runs_and_spans_outside_are_refused(anon: Callable[..., Anon]) -> None:
    a = anon(N * PIECE)
    with _iouring() as b, MlockDmaBackend() as other:
        run = b.pin_run(_ranges(a))
        for call in (
            lambda: other.unpin_run(run, 0, 1),
            lambda: b.unpin_run(run, 0, N + 1),
            lambda: b.unpin_run(run, 3, 2),
            lambda: b.run_handle(run, N),
            lambda: b.unpin_run(object(), 0, 1),  # type: ignore[arg-type]
        ):
            with pytest.raises(InvalidArgument):
                call()
        assert b.pin_count == N and b.pinned_bytes == N * PIECE
        b.close()
        assert not b.run_holds(run, 0)


def test_close_releases_run_pins(anon: Callable[..., Anon]) -> None:
    a = anon(N * PIECE)
    base = status_kib("VmPin")
    b = _iouring()
    b.pin_run(_ranges(a))
    assert status_kib("VmPin") > base
    b.close()
    assert status_kib("VmPin") == base and b.pin_count == 0


def test_big_pieces_take_several_buffers(anon: Callable[..., Anon]) -> None:
    a = anon(4 * MiB)
    if not IOURING_OK:
        pytest.skip(IOURING_REASON)
    with IoUringDmaBackend(buffer_bytes=1 * MiB) as b:
        run = b.pin_run([(a.address, 3 * MiB), (a.address + 3 * MiB, 1 * MiB)])
        assert b.pin_count == 2 and len(b.buffers(b.run_handle(run, 0))) == 3
        b.unpin_run(run, 0, 2)
        assert b.pin_count == 0 and b.pinned_bytes == 0
