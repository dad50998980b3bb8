"""The DmaBackend contract, run against every backend: bad input changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from ramdiscard.consumers.dma import (
    BackendClosed,
    DmaBackend,
    IoUringDmaBackend,
    MlockDmaBackend,
    NullDmaBackend,
    PinHandle,
)
from ramdiscard.errors import InvalidArgument
from ramdiscard.units import MiB
from tests.consumers.dma.conftest import IOURING_OK, IOURING_REASON, Anon

BACKENDS: list[object] = [
    NullDmaBackend,
    MlockDmaBackend,
    pytest.param(IoUringDmaBackend, marks=pytest.mark.skipif(not IOURING_OK, reason=IOURING_REASON)),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[DmaBackend]:
    b: DmaBackend = request.param()
    yield b
    b.close()


@pytest.mark.parametrize(
    ("offset", "size"),
    [(0, 0), (0, -4096), (0, 4095), (1, 4096), (0, 4096 + 1), (2048, 4096)],
)
def test_bad_ranges_rejected(backend: DmaBackend, anon: Callable[..., Anon], offset: int, size: int) -> None:
    a = anon(1 * MiB)
    with pytest.raises(InvalidArgument):
        backend.pin(a.address + offset, size)
    assert backend.pin_count == 0 and backend.pinned_bytes == 0


def test_null_address_and_overflow_rejected(backend: DmaBackend) -> None:
    with pytest.raises(InvalidArgument):
        backend.pin(0, 4096)
    with pytest.raises(InvalidArgument):
        backend.pin((1 << 64) - 4096, 8192)
    with pytest.raises(InvalidArgument):
        backend.pin(4096.0, 4096)  # type: ignore[arg-type]


def test_pin_unpin_roundtrip_and_dma_read(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(1 * MiB)
    a.fill(b"Q")
    h = backend.pin(a.address, 1 * MiB)
    assert (h.host_address, h.size) == (a.address, 1 * MiB)
    assert backend.pin_count == 1 and backend.pinned_bytes == 1 * MiB
    assert backend.dma_read(h, 4090, 10) == b"Q" * 10
    assert backend.dma_read(h, 1 * MiB, 0) == b""
    backend.unpin(h)
    assert backend.pin_count == 0 and backend.pinned_bytes == 0


def test_unknown_double_and_foreign_handles(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(1 * MiB)
    h = backend.pin(a.address, 64 * 1024)
    with pytest.raises(InvalidArgument):
        backend.unpin(PinHandle(h.host_address, h.size, h.token + 10**9))
    with pytest.raises(InvalidArgument):
        backend.unpin(PinHandle(h.host_address, h.size * 2, h.token))  # forged size
    with NullDmaBackend() as other:
        foreign = other.pin(a.address, 4096)
        with pytest.raises(InvalidArgument):
            backend.unpin(foreign)
    backend.unpin(h)
    with pytest.raises(InvalidArgument):
        backend.unpin(h)
    with pytest.raises(InvalidArgument):
        backend.dma_read(h, 0, 1)
    assert backend.pin_count == 0


@pytest.mark.parametrize(("offset", "length"), [(-1, 1), (0, -1), (4096, 1), (1, 4096)])
def test_dma_read_out_of_range(
    backend: DmaBackend, anon: Callable[..., Anon], offset: int, length: int
) -> None:
    a = anon(1 * MiB)
    h = backend.pin(a.address, 4096)
    with pytest.raises(InvalidArgument):
        backend.dma_read(h, offset, length)
    assert backend.pinned_bytes == 4096


def test_closed_backend_refuses_everything(backend: DmaBackend, anon: Callable[..., Anon]) -> None:
    a = anon(1 * MiB)
    h = backend.pin(a.address, 8192)
    backend.close()
    assert backend.closed and backend.pin_count == 0 and backend.pinned_bytes == 0
    for call in (
        lambda: backend.pin(a.address, 4096),
        lambda: backend.unpin(h),
        lambda: backend.dma_read(h, 0, 1),
    ):
        with pytest.raises(BackendClosed):
            call()
    backend.close()  # idempotent
