"""Checksums of page data: CRC-32 (always available) or XXH3-64 (faster; needs the
system's libxxhash, used through ctypes).

Rules:

* The algorithm is chosen by the source and recorded in the stream header; metadata
  sections always use CRC-32. A destination that lacks the chosen algorithm refuses the
  stream before anything changes.
* ``digest(algo, data, seed)`` reads ``data`` in place (no copy; read-only buffers work),
  and mixes in ``seed`` (the CRC-32 of a section's sub-header), so the checksum covers
  the sub-header and the data. The GIL is released while hashing (zlib and ctypes both
  do), so a sender and a receiver thread hash in parallel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import zlib
from enum import IntEnum

import numpy as np


class Checksum(IntEnum):
    CRC32 = 1
    XXH3_64 = 2


def _load_xxh3() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    for name in ("libxxhash.so.0", ctypes.util.find_library("xxhash")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            fn = lib.XXH3_64bits_withSeed
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_uint64
        fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64]
        return fn
    return None


_xxh3 = _load_xxh3()


def available() -> tuple[Checksum, ...]:
    return (Checksum.CRC32, Checksum.XXH3_64) if _xxh3 is not None else (Checksum.CRC32,)


def default() -> Checksum:
    """The fastest algorithm available here."""
    return Checksum.XXH3_64 if _xxh3 is not None else Checksum.CRC32


def digest(algo: Checksum, data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Checksum of ``data`` seeded with ``seed`` (a 32-bit value)."""
    if algo is Checksum.CRC32:
        return zlib.crc32(data, seed)
    if _xxh3 is None:
        raise ValueError("XXH3-64 is not available on this host (libxxhash missing)")
    with memoryview(data) as view:
        n = view.nbytes
        if n == 0:
            return int(_xxh3(None, 0, seed))
        arr = np.frombuffer(view, dtype=np.uint8)
        return int(_xxh3(arr.ctypes.data, n, seed))
