"""Round trips through files (sparse and streamed) and TCP, with fragmented plug patterns."""

from __future__ import annotations

import io
import random
import socket
import threading

import pytest

from ramdiscard import migration
from ramdiscard.migration.checksum import Checksum, available
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh, attach_listener, plugged_pages
from tests.migration.machine import Machine

PATTERNS = {
    "fragmented": [0, 2, 3, 7, 8, 9, 15, 20, 21, 31],
    "first-last": [0, 31],
    "all": list(range(32)),
    "none": [],
    "random": sorted(random.Random(5).sample(range(32), 13)),
}


def _check_same(src: Machine, dst: Machine) -> None:
    assert dst.plugged_blocks() == src.plugged_blocks()
    assert dst.dev.requested_size == src.dev.requested_size
    assert dst.dev.usable_region_size == src.dev.usable_region_size
    assert dst.digests() == src.digests()
    assert dst.resident_outside_plugged() == 0
    assert src.resident_outside_plugged() == 0
    assert not dst.dev.is_busy() and not src.dev.is_busy()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("sparse", [True, False])
def test_file_round_trip(
    machines: Machines, backing: str, pattern: str, sparse: bool, tmp_path: object
) -> None:
    src = machines(backing=backing)
    src.plug_blocks(PATTERNS[pattern])
    src.fill(11)
    dst = machines(backing=backing)
    rdl = attach_listener(dst)
    path = f"{tmp_path}/snap.bin"
    with open(path, "wb") as f:
        stats = migration.save(src.space, src.devices, f, sparse=sparse, chunk_size=1 * MiB)
    assert stats.page_bytes == src.dev.plugged_size + 4 * MiB
    with open(path, "rb") as f:
        migration.load(dst.space, dst.devices, f)
    _check_same(src, dst)
    # The listener (a vfio container) was told about exactly the plugged memory.
    assert rdl.pages == plugged_pages(dst)


@pytest.mark.parametrize("algo", list(Checksum))
def test_stream_round_trip_bytesio_dynamic_memslots(machines: Machines, backing: str, algo: Checksum) -> None:
    if algo not in available():
        pytest.skip(f"{algo.name} is not available on this host (libxxhash missing)")
    src = machines(256 * MiB, backing=backing, dynamic=True)
    src.plug_blocks([0, 1, 64, 65, 66, 127])  # memslots 0, 2 (and 3) of 4
    src.fill(3)
    dst = machines(256 * MiB, backing=backing, dynamic=True)
    buf = io.BytesIO()
    migration.save(src.space, src.devices, buf, checksum=algo)
    buf.seek(0)
    migration.load(dst.space, dst.devices, buf)
    _check_same(src, dst)
    assert dst.dev.mapped_memslots == src.dev.mapped_memslots


def test_tcp_round_trip_threads(machines: Machines, backing: str) -> None:
    src = machines(backing=backing)
    src.plug_blocks(PATTERNS["fragmented"])
    src.fill(5)
    dst = machines(backing=backing)
    seen: list[migration.Progress] = []
    result: dict[str, object] = {}
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                result["stats"] = migration.receive_from(ls, dst.space, dst.devices, accept_timeout=30)
            except Exception as exc:  # pragma: no cover - reported below
                result["error"] = exc

        t = threading.Thread(target=receive)
        t.start()
        stats = migration.migrate_to("127.0.0.1", port, src.space, src.devices, progress=seen.append)
        t.join(30)
    assert "error" not in result, result
    assert stats.page_bytes == src.dev.plugged_size + 4 * MiB
    assert seen and seen[-1].bytes_done == stats.page_bytes and seen[-1].finished
    assert seen[-1].pages_done == stats.page_bytes // 4096
    _check_same(src, dst)


def test_refused_stream_fails_the_source(machines: Machines) -> None:
    """A destination with other geometry answers with its error; the source raises it."""
    src = machines()
    src.plug_blocks([1, 2])
    dst = machines(32 * MiB)
    errors: list[Exception] = []
    with socket.create_server(("127.0.0.1", 0)) as ls:
        port = ls.getsockname()[1]

        def receive() -> None:
            try:
                migration.receive_from(ls, dst.space, dst.devices, accept_timeout=30)
            except migration.MigrationError as exc:
                errors.append(exc)

        t = threading.Thread(target=receive)
        t.start()
        with pytest.raises(migration.MigrationError, match="geometry mismatch"):
            migration.migrate_to("127.0.0.1", port, src.space, src.devices)
        t.join(30)
    assert errors
    assert_fresh(dst)
    assert not src.dev.is_busy()
