"""The machine-consumer wrapper: factory, status, teardown."""

from __future__ import annotations

import pytest

from ramdiscard.consumers.blockdma import BlockDmaConsumer, make_backend, make_consumer
from ramdiscard.errors import InvalidArgument
from ramdiscard.memory import MemoryRegion
from ramdiscard.ramblocks import RamBlockRegistry
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB
from tests.conftest import FakeRam


def test_factory_status_and_close() -> None:
    registry, policy = RamBlockRegistry(), DiscardPolicy()
    mr = MemoryRegion.new_ram("boot", FakeRam(8 * MiB))
    registry.add(mr)
    consumer = make_consumer("nvme0", backend="null", policy=policy, registry=registry)
    assert isinstance(consumer, BlockDmaConsumer) and consumer.kind == "blockdma"
    consumer.attach(None)
    status = consumer.status()
    assert status["pinned_bytes"] == 8 * MiB and status["modes"] == {"boot": "whole"}
    assert policy.snapshot().uncoordinated_disable == 1
    consumer.close()
    consumer.close()
    assert policy.snapshot().uncoordinated_disable == 0
    assert "pinned_bytes" not in consumer.status()


def test_bad_backend_name_and_failed_attach_hold_nothing() -> None:
    with pytest.raises(InvalidArgument, match="unknown DMA backend"):
        BlockDmaConsumer("x", backend="vfio")
    with pytest.raises(InvalidArgument, match="unknown DMA backend"):
        make_backend("spdk")
    registry, policy = RamBlockRegistry(), DiscardPolicy()
    policy.require(True)  # conflicts with the uncoordinated-disable count
    consumer = BlockDmaConsumer("nvme0", backend="null", policy=policy, registry=registry)
    with pytest.raises(Exception, match="Cannot disable uncoordinated discarding"):
        consumer.attach(None)
    assert consumer.mapper is None and registry.notifiers == ()
