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
* :class:`Hasher` computes the same value piece by piece: feeding consecutive pieces of
  ``data`` to ``update`` and calling ``value()`` equals ``digest(algo, data, seed)``,
  however the data is split. A receiver hashes each piece right after the kernel wrote
  it, while it is still in the CPU cache, instead of reading guest memory a second time.

libxxhash exports ``*_dispatch`` variants that pick the widest vector unit at run time
(AVX2/AVX-512; the plain symbols are built for baseline SSE2); they compute the same
values and are used when present.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import weakref
import zlib
from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Checksum(IntEnum):
    CRC32 = 1
    XXH3_64 = 2


@dataclass(frozen=True, slots=True)
class _Xxh3:
    one_shot: ctypes._CFuncPtr  # type: ignore[name-defined]
    create: ctypes._CFuncPtr  # type: ignore[name-defined]
    free: ctypes._CFuncPtr  # type: ignore[name-defined]
    reset: ctypes._CFuncPtr  # type: ignore[name-defined]
    update: ctypes._CFuncPtr  # type: ignore[name-defined]
    final: ctypes._CFuncPtr  # type: ignore[name-defined]


def _symbol(lib: ctypes.CDLL, name: str, restype: object, argtypes: list[object]) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    for candidate in (name + "_dispatch", name):
        fn = getattr(lib, candidate, None)
        if fn is not None:
            fn.restype = restype
            fn.argtypes = argtypes
            return fn
    raise AttributeError(name)


def _load_xxh3() -> _Xxh3 | None:
    vp, u64 = ctypes.c_void_p, ctypes.c_uint64
    for name in ("libxxhash.so.0", ctypes.util.find_library("xxhash")):
        if not name:
            continue
        try:
            lib = ctypes.CDLL(name)
            return _Xxh3(
                one_shot=_symbol(lib, "XXH3_64bits_withSeed", u64, [vp, ctypes.c_size_t, u64]),
                create=_symbol(lib, "XXH3_createState", vp, []),
                free=_symbol(lib, "XXH3_freeState", ctypes.c_int, [vp]),
                reset=_symbol(lib, "XXH3_64bits_reset_withSeed", ctypes.c_int, [vp, u64]),
                update=_symbol(lib, "XXH3_64bits_update", ctypes.c_int, [vp, vp, ctypes.c_size_t]),
                final=_symbol(lib, "XXH3_64bits_digest", u64, [vp]),
            )
        except (OSError, AttributeError):
            continue
    return None


_xxh3 = _load_xxh3()


def available() -> tuple[Checksum, ...]:
    return (Checksum.CRC32, Checksum.XXH3_64) if _xxh3 is not None else (Checksum.CRC32,)


def default() -> Checksum:
    """The fastest algorithm available here."""
    return Checksum.XXH3_64 if _xxh3 is not None else Checksum.CRC32


def _require_xxh3() -> _Xxh3:
    if _xxh3 is None:
        raise ValueError("XXH3-64 is not available on this host (libxxhash missing)")
    return _xxh3


def address(view: memoryview) -> int:
    """Address of the first byte of a C-contiguous buffer (read-only ones included)."""
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data) if view.nbytes else 0


def digest(algo: Checksum, data: bytes | bytearray | memoryview, seed: int = 0) -> int:
    """Checksum of ``data`` seeded with ``seed`` (a 32-bit value)."""
    if algo is Checksum.CRC32:
        return zlib.crc32(data, seed)
    xxh3 = _require_xxh3()
    with memoryview(data) as view:
        return int(xxh3.one_shot(address(view) or None, view.nbytes, seed))


class Hasher:
    """Incremental :func:`digest`: ``reset(seed)``, ``update`` with consecutive pieces
    (as buffers or as raw ``(address, length)`` of memory the caller keeps alive), then
    ``value()``. One object can be reused for any number of sections; for XXH3 it owns
    a libxxhash state, freed when the object is collected. Raises ValueError when the
    algorithm is not available here."""

    def __init__(self, algo: Checksum) -> None:
        self.algo = algo
        self._crc = 0
        self._state: int | None = None
        if algo is Checksum.XXH3_64:
            xxh3 = _require_xxh3()
            state = xxh3.create()
            if not state:
                raise MemoryError("XXH3_createState failed")
            self._state = int(state)
            weakref.finalize(self, xxh3.free, state)

    def reset(self, seed: int = 0) -> None:
        if self._state is None:
            self._crc = seed
        else:
            assert _xxh3 is not None
            _xxh3.reset(self._state, seed)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is None:
            self._crc = zlib.crc32(data, self._crc)
            return
        with memoryview(data) as view:
            if view.nbytes:
                self.update_raw(address(view), view.nbytes)

    def update_raw(self, addr: int, length: int) -> None:
        """Hash ``length`` bytes at ``addr``; the caller guarantees the memory is mapped
        and readable (a slice of a buffer it holds)."""
        if self._state is None:
            self._crc = zlib.crc32((ctypes.c_char * length).from_address(addr), self._crc)
        else:
            assert _xxh3 is not None
            _xxh3.update(self._state, addr, length)

    def value(self) -> int:
        if self._state is None:
            return self._crc
        assert _xxh3 is not None
        return int(_xxh3.final(self._state))
