"""Every kind of broken stream is refused, and the destination is left as it was."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard import faults, migration
from ramdiscard.faults import Op
from ramdiscard.migration.stream import SECTION_HEADER, STREAM_HEADER
from ramdiscard.units import MiB
from tests.migration.conftest import Machines, assert_fresh, attach_listener
from tests.migration.machine import Machine

SIZE = 16 * MiB
BLOCKS = [0, 2, 3, 6, 7]


def _stream(src: Machine, sparse: bool = False, path: str | None = None) -> bytes:
    if path is not None:
        with open(path, "wb") as f:
            migration.save(src.space, src.devices, f, sparse=sparse, chunk_size=1 * MiB)
        with open(path, "rb") as f:
            return f.read()
    buf = io.BytesIO()
    migration.save(src.space, src.devices, buf, sparse=False, chunk_size=1 * MiB)
    return buf.getvalue()


def _boundaries(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of the stream header and of every section (header + payload)."""
    out = [(0, STREAM_HEADER.size)]
    pos = STREAM_HEADER.size
    while pos < len(data):
        _t, _f, length, _c, _h = SECTION_HEADER.unpack_from(data, pos)
        out.append((pos, pos + SECTION_HEADER.size + length))
        pos += SECTION_HEADER.size + length
    return out


@pytest.fixture
def pair(machines: Machines) -> tuple[Machine, Machine]:
    src = machines(SIZE, low=1 * MiB)
    src.plug_blocks(BLOCKS)
    src.fill(9)
    dst = machines(SIZE, low=1 * MiB)
    return src, dst


def _refused(dst: Machine, data: bytes, match: str | None = None) -> None:
    rdl = attach_listener(dst)
    with pytest.raises(migration.MigrationError, match=match):
        migration.load(dst.space, dst.devices, io.BytesIO(data))
    assert_fresh(dst)
    assert not rdl.pages
    dst.dev.unregister_listener(rdl)


def _loads(src: Machine, dst: Machine, data: bytes) -> None:
    migration.load(dst.space, dst.devices, io.BytesIO(data))
    assert dst.digests() == src.digests()


def test_truncated_at_every_section_boundary_and_inside(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    data = _stream(src)
    cuts = sorted({c for s, e in _boundaries(data) for c in (s, s + 1, s + 23, s + 40, (s + e) // 2, e - 1)})
    for cut in cuts:
        if cut < len(data):
            _refused(dst, data[:cut], "truncated")
    _loads(src, dst, data)  # the destination is still usable


def test_byte_flip_in_every_section(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    data = _stream(src)
    for start, end in _boundaries(data):
        for pos in sorted({start, start + 9, end - 1, (start + end) // 2}):
            bad = bytearray(data)
            bad[pos] ^= 0x10
            _refused(dst, bytes(bad))
    _loads(src, dst, data)


def test_wrong_version_and_magic(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    data = bytearray(_stream(src))
    v2 = bytearray(data)
    struct.pack_into("<H", v2, 8, 2)
    struct.pack_into("<I", v2, 16, zlib.crc32(bytes(v2[:16])))
    _refused(dst, bytes(v2), "unsupported migration stream version 2")
    other = bytearray(data)
    other[:8] = b"QEVM\0\0\0\3"
    _refused(dst, bytes(other), "not a ramdiscard migration stream")
    _refused(dst, b"", "truncated")


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"size": 32 * MiB}, "geometry mismatch"),
        ({"block": 1 * MiB}, "block size"),
        ({"addr": 8 << 30}, "addr"),
        ({"low": 2 * MiB}, "geometry mismatch"),
        ({"low": 0}, "geometry mismatch"),
        ({"dev_id": "vmem1"}, "geometry mismatch"),
    ],
)
def test_wrong_geometry(
    machines: Machines, pair: tuple[Machine, Machine], kw: dict[str, int], match: str
) -> None:
    src, _dst = pair
    data = _stream(src)
    args = {"size": SIZE, "low": 1 * MiB, **kw}
    other = machines(args.pop("size"), **args)  # type: ignore[arg-type]
    _refused(other, data, match)


def test_destination_with_plugged_memory_is_refused(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    data = _stream(src)
    dst.plug_blocks([5])
    with pytest.raises(migration.MigrationError, match="must start empty"):
        migration.load(dst.space, dst.devices, io.BytesIO(data))
    assert dst.plugged_blocks() == [5]


def test_listener_refusal_resets_everything(pair: tuple[Machine, Machine]) -> None:
    src, dst = pair
    data = _stream(src)
    rdl = attach_listener(dst)

    def refuse(section: object) -> None:
        raise OSError(12, "cannot pin")

    rdl.notify_populate = refuse  # type: ignore[method-assign]
    with pytest.raises(migration.MigrationError, match="refused"):
        migration.load(dst.space, dst.devices, io.BytesIO(data))
    assert_fresh(dst)


@pytest.mark.parametrize("op", [Op.FILE_READ, Op.POPULATE, Op.DISCARD])
def test_host_faults_during_restore_reset(pair: tuple[Machine, Machine], op: Op) -> None:
    src, dst = pair
    data = _stream(src)
    with faults.counting() as log:
        _loads(src, dst, data)
    n = log.counts[op]
    dst.dev.unplug_all()
    for ram in (dst.ram, dst.low):
        assert ram is not None
        ram.discard_range(0, ram.size)
    for nth in range(1, n + 1):
        with faults.inject(op, nth):
            try:
                migration.load(dst.space, dst.devices, io.BytesIO(data))
            except migration.MigrationError:
                assert_fresh(dst)
                continue
        # A fault that did not fail the load (e.g. a re-discard of empty memory) left a
        # complete restore: reset for the next round.
        assert dst.digests() == src.digests()
        dst.dev.unplug_all()
        for ram in (dst.ram, dst.low):
            assert ram is not None
            ram.discard_range(0, ram.size)


def test_sparse_file_truncated_and_corrupt(pair: tuple[Machine, Machine], tmp_path: object) -> None:
    src, dst = pair
    path = f"{tmp_path}/snap"
    data = _stream(src, sparse=True, path=path)
    for cut in (10, 100, len(data) - 4096, len(data) - 1):
        with open(path, "wb") as f:
            f.write(data[:cut])
        with open(path, "rb") as f, pytest.raises(migration.MigrationError):
            migration.load(dst.space, dst.devices, f)
        assert_fresh(dst)
    bad = bytearray(data)
    bad[len(data) - 4096 * 3] ^= 1  # page data (the last run is data)
    with open(path, "wb") as f:
        f.write(bad)
    with open(path, "rb") as f, pytest.raises(migration.MigrationError, match="checksum"):
        migration.load(dst.space, dst.devices, f)
    assert_fresh(dst)


@pytest.fixture(scope="module")
def hyp_pair() -> Iterator[tuple[Machine, Machine, bytes]]:
    ms = Machines()
    src = ms(SIZE, low=1 * MiB)
    src.plug_blocks(BLOCKS)
    src.fill(4)
    yield src, ms(SIZE, low=1 * MiB), _stream(src)
    ms.close()


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_random_truncation_and_bit_flips(
    hyp_pair: tuple[Machine, Machine, bytes], data: st.DataObject
) -> None:
    src, dst, stream = hyp_pair
    mutated = bytearray(stream)
    if data.draw(st.booleans(), "truncate"):
        mutated = mutated[: data.draw(st.integers(0, len(stream) - 1), "cut")]
    flips = data.draw(st.lists(st.integers(0, max(0, len(mutated) * 8 - 1)), max_size=4), "flips")
    for bit in flips:
        if mutated:
            mutated[bit // 8] ^= 1 << (bit % 8)
    if bytes(mutated) == stream:
        _loads(src, dst, stream)
        dst.dev.unplug_all()
        assert dst.low is not None
        dst.low.discard_range(0, dst.low.size)
        return
    _refused(dst, bytes(mutated))
