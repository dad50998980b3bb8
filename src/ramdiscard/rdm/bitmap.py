"""A fixed-size bitmap with word-level range operations and run extraction.

Rules:

* Bit ``i`` lives in 64-bit word ``i // 64`` at bit ``i % 64`` (little-endian), so the
  byte serialisation is the kernel's and QEMU's bitmap layout.
* Range operations (set, clear, count, all-set, all-clear) touch only the words of the
  range: their cost grows with the range, never with the bitmap.
* Run extraction finds bit transitions with numpy word operations
  (``x ^ (x << 1 | carry)``), expands only the words that contain transitions, and walks
  the bitmap in chunks, so it costs a word scan plus O(runs) and bounded memory even on a
  2^28-bit map with 2^27 runs.
* A popcount of the whole map is kept incrementally.

Storage: one ``array('Q')`` with a numpy view of the same memory. Single words (the head
and tail of every range, all of a short range) are read and written through the array as
Python ints; numpy only runs over the inner words of long ranges and run extraction, since
a numpy call costs several times a word operation for tiny ranges.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

_ALL = (1 << 64) - 1
_CHUNK_WORDS = 1 << 14
_ONE = np.uint64(1)
_SHIFT63 = np.uint64(63)


class Bitmap:
    """``nbits`` bits, all clear at creation."""

    __slots__ = ("_arr", "_count", "_words", "nbits")

    def __init__(self, nbits: int) -> None:
        if nbits < 0:
            raise ValueError(f"negative bitmap size {nbits}")
        self.nbits = nbits
        self._arr = array("Q", bytes(8 * ((nbits + 63) // 64)))
        self._words: npt.NDArray[np.uint64] = np.frombuffer(self._arr, dtype=np.uint64)
        self._count = 0

    # -- serialisation ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Little-endian bytes, ``ceil(nbits / 8)`` of them."""
        return self._words.astype("<u8", copy=False).tobytes()[: (self.nbits + 7) // 8]

    @classmethod
    def from_bytes(cls, nbits: int, data: bytes) -> Bitmap:
        """Inverse of :meth:`to_bytes`. Raises ValueError on a wrong length or set padding bits."""
        want = (nbits + 7) // 8
        if len(data) != want:
            raise ValueError(f"bitmap of {nbits} bits needs {want} bytes, got {len(data)}")
        bm = cls(nbits)
        padded = data + bytes(len(bm._words) * 8 - len(data))
        words = np.frombuffer(padded, dtype="<u8").astype(np.uint64)
        if nbits % 64 and len(words) and int(words[-1]) >> (nbits % 64):
            raise ValueError("bitmap has bits set beyond its size")
        bm._words[:] = words
        bm._count = int(np.bitwise_count(bm._words).sum())
        return bm

    def copy(self) -> Bitmap:
        other = Bitmap(self.nbits)
        other._words[:] = self._words
        other._count = self._count
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.nbits == other.nbits and bool(np.array_equal(self._words, other._words))

    __hash__ = None  # type: ignore[assignment]

    # -- single bits and counts ----------------------------------------------------------

    def get(self, i: int) -> bool:
        return bool((self._arr[i >> 6] >> (i & 63)) & 1)

    @property
    def count(self) -> int:
        """Number of set bits."""
        return self._count

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.nbits:
            raise ValueError(f"bit range [{start}, {end}) outside bitmap of {self.nbits} bits")

    def count_range(self, start: int, end: int) -> int:
        """Set bits in ``[start, end)``."""
        self._check(start, end)
        if start == end:
            return 0
        arr = self._arr
        ws, we = start >> 6, (end - 1) >> 6
        if ws == we:
            return (arr[ws] & _mask(start & 63, ((end - 1) & 63) + 1)).bit_count()
        total = (arr[ws] & _mask(start & 63, 64)).bit_count()
        total += (arr[we] & _mask(0, ((end - 1) & 63) + 1)).bit_count()
        if we > ws + 1:
            total += int(np.bitwise_count(self._words[ws + 1 : we]).sum())
        return total

    def all_set(self, start: int, end: int) -> bool:
        return self.count_range(start, end) == end - start

    def all_clear(self, start: int, end: int) -> bool:
        return self.count_range(start, end) == 0

    # -- range updates -----------------------------------------------------------------

    def set_range(self, start: int, end: int) -> None:
        before = self.count_range(start, end)
        self._apply(start, end, True)
        self._count += (end - start) - before

    def clear_range(self, start: int, end: int) -> None:
        before = self.count_range(start, end)
        self._apply(start, end, False)
        self._count -= before

    def clear_all(self) -> None:
        self._words[:] = 0
        self._count = 0

    def _apply(self, start: int, end: int, value: bool) -> None:
        if start == end:
            return
        arr = self._arr
        ws, we = start >> 6, (end - 1) >> 6
        if ws == we:
            m = _mask(start & 63, ((end - 1) & 63) + 1)
            w = arr[ws]
            arr[ws] = (w | m) if value else (w & ~m & _ALL)
            return
        head = _mask(start & 63, 64)
        tail = _mask(0, ((end - 1) & 63) + 1)
        if value:
            arr[ws] |= head
            arr[we] |= tail
            if we > ws + 1:
                self._words[ws + 1 : we] = _ALL
        else:
            arr[ws] &= ~head & _ALL
            arr[we] &= ~tail & _ALL
            if we > ws + 1:
                self._words[ws + 1 : we] = 0

    # -- runs ---------------------------------------------------------------------------

    def runs(self, start: int, end: int, value: bool = True) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(run_start, run_end)`` of bits equal to ``value`` inside
        ``[start, end)``, clipped to it, ascending."""
        self._check(start, end)
        open_start: int | None = None
        pos = start
        while pos < end:
            chunk_end = min(end, ((pos >> 6) + _CHUNK_WORDS) << 6)
            starts, ends = self._chunk_runs(pos, chunk_end, value)
            n = len(starts)
            if n:
                starts_l: list[int] = starts.tolist()
                ends_l: list[int] = ends.tolist()
                if open_start is not None:
                    if starts_l[0] != pos:
                        yield open_start, pos
                    else:
                        starts_l[0] = open_start
                    open_start = None
                if ends_l[-1] == chunk_end and chunk_end < end:
                    open_start = starts_l.pop()
                    ends_l.pop()
                yield from zip(starts_l, ends_l, strict=True)
            elif open_start is not None:
                yield open_start, pos
                open_start = None
            pos = chunk_end
        if open_start is not None:
            yield open_start, end

    def _chunk_runs(
        self, start: int, end: int, value: bool
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        w0, w1 = start >> 6, ((end - 1) >> 6) + 1
        w = self._words[w0:w1]
        if not value:
            w = ~w
        prev = np.empty_like(w)
        prev[0] = 0
        prev[1:] = w[:-1] >> _SHIFT63
        trans = w ^ ((w << _ONE) | prev)
        nz = np.flatnonzero(trans)
        first_value = bool((int(w[(start >> 6) - w0]) >> (start & 63)) & 1)
        if len(nz):
            bits = np.unpackbits(trans[nz].view(np.uint8), bitorder="little").reshape(-1, 64)
            rows, cols = np.nonzero(bits)
            pos = (nz[rows].astype(np.int64) + w0) * 64 + cols
            pos = pos[(pos > start) & (pos < end)]
        else:
            pos = np.empty(0, dtype=np.int64)
        bounds = np.concatenate(([start], pos, [end])).astype(np.int64)
        if first_value:
            return bounds[0:-1:2], bounds[1::2]
        return bounds[1:-1:2], bounds[2::2]


def _mask(lo: int, hi: int) -> int:
    """Bits lo..hi-1 of a 64-bit word."""
    return ((1 << (hi - lo)) - 1) << lo
