"""Page checksums: one-shot and incremental hashing agree, and XXH3 is the standard XXH3
whichever libxxhash entry point (SSE2 or run-time dispatched AVX) computes it."""

from __future__ import annotations

import ctypes
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.migration import checksum
from ramdiscard.migration.checksum import Checksum, Hasher, address, available, digest

ALGOS = [
    pytest.param(a, marks=pytest.mark.skipif(a not in available(), reason="libxxhash missing"))
    for a in Checksum
]


def _splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@pytest.mark.parametrize("algo", ALGOS)
@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=5000),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=8),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
    raw=st.booleans(),
)
def test_incremental_equals_one_shot(
    algo: Checksum, data: bytes, cuts: list[int], seed: int, raw: bool
) -> None:
    hasher = Hasher(algo)
    for _again in range(2):  # a reset makes the object reusable
        hasher.reset(seed)
        buf = bytearray(data)
        base, pos = address(memoryview(buf)), 0
        for piece in _splits(data, cuts):
            if raw:
                hasher.update_raw(base + pos, len(piece))
            else:
                hasher.update(piece)
            pos += len(piece)
        assert hasher.value() == digest(algo, data, seed)
    if data:  # a single flipped bit is always caught by CRC-32 (and by XXH3-64 here)
        flipped = bytes([data[0] ^ 1]) + data[1:]
        assert digest(algo, flipped, seed) != digest(algo, data, seed)


@pytest.mark.skipif(Checksum.XXH3_64 not in available(), reason="libxxhash missing")
def test_xxh3_is_the_standard_function() -> None:
    # Known answer from the xxHash reference (XXH3_64bits of nothing, seed 0).
    assert digest(Checksum.XXH3_64, b"") == 0x2D06800538D394C2
    # The entry point used here (possibly the AVX dispatcher) against the library's
    # plain SSE2 build, across stripe (64 B), block (1 KiB) and buffer boundaries.
    lib = ctypes.CDLL("libxxhash.so.0")
    plain = lib.XXH3_64bits_withSeed
    plain.restype, plain.argtypes = ctypes.c_uint64, [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    blob = bytes((i * 131 + 7) % 251 for i in range(300_000))
    for n in (1, 3, 16, 17, 128, 129, 240, 241, 1024, 4095, 65_537, 300_000):
        assert digest(Checksum.XXH3_64, blob[:n], 0x1234) == plain(blob[:n], n, 0x1234)


def test_xxh3_unavailable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "_xxh3", None)
    assert available() == (Checksum.CRC32,)
    with pytest.raises(ValueError, match="libxxhash missing"):
        digest(Checksum.XXH3_64, b"x")
    with pytest.raises(ValueError, match="libxxhash missing"):
        Hasher(Checksum.XXH3_64)
