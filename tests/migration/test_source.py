"""Source-side guarantees: BUSY during migration only, discarded memory never read,
sparse snapshot files, failures release the devices."""

from __future__ import annotations

import io
import os

import pytest

from ramdiscard import faults, migration
from ramdiscard.faults import Op
from ramdiscard.hostmem import proc_status
from ramdiscard.migration.source import SPARSE_ALIGN
from ramdiscard.providers.virtio_mem import ResponseType
from ramdiscard.units import MiB
from tests.migration.conftest import Machines


def test_busy_during_migration_and_not_after(machines: Machines) -> None:
    src = machines(low=0)
    src.plug_blocks([0, 1, 5])
    answers: list[tuple[ResponseType, ResponseType, ResponseType]] = []

    def during(p: migration.Progress) -> None:
        d = src.dev
        answers.append((d.plug(d.addr + 10 * src.block, 1), d.unplug(d.addr, 1), d.unplug_all()))

    migration.save(src.space, src.devices, io.BytesIO(), progress=during, chunk_size=1 * MiB)
    assert answers and all(a == (ResponseType.BUSY,) * 3 for a in answers)
    assert src.plugged_blocks() == [0, 1, 5]
    assert src.dev.plug(src.dev.addr + 10 * src.block, 1) is ResponseType.ACK
    assert src.dev.unplug(src.dev.addr, 1) is ResponseType.ACK


def test_previous_busy_predicate_kept_and_restored(machines: Machines) -> None:
    src = machines(low=0)
    other = [False]
    src.dev.set_busy_predicate(lambda: other[0])
    migration.save(src.space, src.devices, io.BytesIO())
    assert not src.dev.is_busy()
    other[0] = True
    assert src.dev.is_busy()


@pytest.mark.parametrize("op", [Op.FILE_WRITE])
def test_failed_save_releases_busy(machines: Machines, op: Op) -> None:
    src = machines(low=0)
    src.plug_blocks([0, 3])
    with faults.counting() as log:
        migration.save(src.space, src.devices, io.BytesIO(), sparse=False, chunk_size=1 * MiB)
    for nth in range(1, log.counts[op] + 1):
        with faults.inject(op, nth), pytest.raises(OSError):
            migration.save(src.space, src.devices, io.BytesIO(), sparse=False, chunk_size=1 * MiB)
        assert not src.dev.is_busy()
    assert src.plugged_blocks() == [0, 3]


def test_source_never_reads_discarded_memory(machines: Machines, backing: str) -> None:
    """A 256 MiB region with 16 MiB plugged: the source's RSS does not grow while the
    stream is written, and nothing outside the plugged blocks becomes resident."""
    src = machines(256 * MiB, backing=backing, low=0)
    src.plug_blocks(range(0, 128, 16))
    src.fill(1)
    resident = src.ram.resident_bytes()
    with open(os.devnull, "wb") as sink:
        before = proc_status()
        migration.save(src.space, src.devices, sink, sparse=False)
        after = proc_status()
    assert src.resident_outside_plugged() == 0
    assert src.ram.resident_bytes() == resident
    grew = (after.vm_rss - before.vm_rss) if backing == "anonymous" else (after.rss_shmem - before.rss_shmem)
    assert grew < 8 * MiB, f"RSS grew by {grew} bytes"


def _data_extents(path: str) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def test_sparse_snapshot_holes(machines: Machines, backing: str, tmp_path: object) -> None:
    src = machines(256 * MiB, backing=backing, low=0)
    blocks = [3, 4, 5, 40, 90, 91, 127]
    src.plug_blocks(blocks)
    src.fill(2)
    path = f"{tmp_path}/snap"
    with open(path, "wb") as f:
        migration.save(src.space, src.devices, f)
    st = os.stat(path)
    assert st.st_size >= 256 * MiB
    plugged = len(blocks) * src.block
    assert plugged <= st.st_blocks * 512 <= plugged + SPARSE_ALIGN
    extents = _data_extents(path)
    # The metadata, then exactly the plugged runs at data_base + region offset.
    data_base = extents[1][0] - 3 * src.block
    assert extents[0][0] == 0 and extents[0][1] <= data_base
    assert extents[1:] == [(data_base + s, data_base + s + n) for s, n in src.dev.plugged_ranges()]
    dst = machines(256 * MiB, backing=backing, low=0)
    with open(path, "rb") as f:
        migration.load(dst.space, dst.devices, f)
    assert dst.digests() == src.digests()
    assert dst.resident_outside_plugged() == 0
