"""Every concrete implementation satisfies its effect interface (runtime_checkable
isinstance), and objects missing a capability are told apart from those that have it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ramdiscard.consumers.dma import IoUringDmaBackend, MlockDmaBackend, NullDmaBackend, iouring_available
from ramdiscard.consumers.kvm import Kvm, KvmVm, ModelVm
from ramdiscard.hostmem import RamBlock
from ramdiscard.interfaces import (
    DiscardableMemory,
    DmaPinner,
    FileBackedMemory,
    HostMemory,
    MappedMemory,
    MeasurableMemory,
    MemslotVm,
    ResizableMemory,
    Virtqueue,
    reserved_size,
)
from ramdiscard.units import MiB
from ramdiscard.virtqueue import LocalVirtqueue
from tests.providers.virtio_mem.conftest import FakeRam


@pytest.fixture(params=["anonymous", "memfd", "file"])
def ram_block(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RamBlock]:
    path = tmp_path / "ram" if request.param == "file" else None
    with RamBlock(2 * MiB, request.param, path=path, max_size=4 * MiB) as block:
        yield block


def test_ram_blocks_are_host_memory_with_every_capability(ram_block: RamBlock) -> None:
    for proto in (
        HostMemory,
        DiscardableMemory,
        MeasurableMemory,
        ResizableMemory,
        MappedMemory,
        FileBackedMemory,
    ):
        assert isinstance(ram_block, proto), proto.__name__
    assert reserved_size(ram_block) == 4 * MiB != ram_block.size
    assert (ram_block.fd is None) == (ram_block.backing == "anonymous")


def test_a_double_without_optional_capabilities_is_told_apart() -> None:
    fake = FakeRam(8 * MiB)
    assert isinstance(fake, HostMemory) and isinstance(fake, DiscardableMemory)
    assert not isinstance(fake, MeasurableMemory) and not isinstance(fake, ResizableMemory)
    assert not isinstance(fake, FileBackedMemory)
    assert reserved_size(fake) == 8 * MiB
    assert not isinstance(object(), HostMemory)


@pytest.mark.parametrize("make", [NullDmaBackend, MlockDmaBackend], ids=["null", "mlock"])
def test_dma_backends_are_dma_pinners(make: type[NullDmaBackend | MlockDmaBackend]) -> None:
    with make() as backend:
        assert isinstance(backend, DmaPinner)
    assert not isinstance(FakeRam(MiB), DmaPinner)


@pytest.mark.skipif(not iouring_available()[0], reason=iouring_available()[1])
def test_the_iouring_backend_is_a_dma_pinner() -> None:
    with IoUringDmaBackend() as backend:
        assert isinstance(backend, DmaPinner)


def test_model_vm_is_a_memslot_vm() -> None:
    assert isinstance(ModelVm(), MemslotVm)
    assert not isinstance(NullDmaBackend(), MemslotVm)


@pytest.mark.skipif(not Kvm.available()[0], reason=Kvm.available()[1])
def test_kvm_vm_is_a_memslot_vm() -> None:
    with KvmVm() as vm:
        assert isinstance(vm, MemslotVm)


def test_local_virtqueue_is_a_virtqueue() -> None:
    assert isinstance(LocalVirtqueue(lambda vq: None), Virtqueue)
    assert not isinstance(ModelVm(), Virtqueue)
