"""A fixed-size bitmap with word-level range operations and run extraction.

Rules:

* Bit ``i`` lives in 64-bit word ``i // 64`` at bit ``i % 64`` (little-endian), so the
  byte serialisation is the kernel's and QEMU's bitmap layout.
* Range operations (set, clear, count, all-set, all-clear) touch only the words of the
  range: their cost grows with the range, never with the bitmap.
* A summary level keeps the number of set bits of every group of 64 words (4096 bits).
  Every range operation updates it in O(range): single words by their popcount change,
  whole groups by assignment, the at most two partly covered groups of a long range by a
  recount of the covered words. A popcount of the whole map is kept the same way.
* Queries use the summary: ``count_range`` (hence ``all_set``/``all_clear``) costs the
  words of the two end groups plus one entry per group in between.
* Run extraction reads the summary first: a group whose count is 0 or full holds no
  transition inside it, so only the words of mixed groups and of groups whose state
  differs from the previous group's are examined. On those words it finds bit
  transitions with numpy word operations (``x ^ (x << 1 | carry)``, the carry read from
  the word before), expands only the words that contain transitions, and works in chunks
  of candidate words, so all-set, all-clear and few-run maps cost a pass over the summary
  (1/4096 of the map) plus O(runs), dense maps a word scan plus O(runs), with bounded
  memory even on a 2^28-bit map with 2^27 runs.

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
GROUP_WORDS = 64
"""Words per summary group."""
GROUP_BITS = GROUP_WORDS * 64
_CHUNK_GROUPS = 256
_ONE = np.uint64(1)
_SHIFT63 = np.uint64(63)
_FEW_WORDS = 48
"""Up to this many words with transitions are expanded in Python, beyond it by numpy."""
_STATE = np.ones(GROUP_BITS + 1, dtype=np.uint8)
_STATE[0], _STATE[GROUP_BITS] = 0, 2
"""Group state by its count: 0 clear, 1 mixed, 2 full."""
_FEW_GROUPS = 64
"""Up to this many candidate groups are first tried as one-transition groups."""
_ZEROS = bytes(8 * GROUP_WORDS)
_ONES = b"\xff" * (8 * GROUP_WORDS)


class Bitmap:
    """``nbits`` bits, all clear at creation."""

    __slots__ = ("_arr", "_count", "_gc", "_gcount", "_last_cap", "_raw", "_rows", "_words", "nbits")

    def __init__(self, nbits: int) -> None:
        if nbits < 0:
            raise ValueError(f"negative bitmap size {nbits}")
        self.nbits = nbits
        ngroups = (nbits + GROUP_BITS - 1) // GROUP_BITS
        # Words past the last bit (up to the end of the last group) stay zero.
        self._arr = array("Q", bytes(8 * GROUP_WORDS * ngroups))
        self._words: npt.NDArray[np.uint64] = np.frombuffer(self._arr, dtype=np.uint64)
        self._raw = memoryview(self._arr).cast("B")
        self._rows = self._words.reshape(ngroups, GROUP_WORDS)
        self._count = 0
        self._gcount = array("H", bytes(2 * ngroups))
        self._gc: npt.NDArray[np.uint16] = np.frombuffer(self._gcount, dtype=np.uint16)
        self._last_cap = nbits - (ngroups - 1) * GROUP_BITS if ngroups else 0

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
        if nbits % 64 and int(words[(nbits - 1) // 64]) >> (nbits % 64):
            raise ValueError("bitmap has bits set beyond its size")
        bm._words[:] = words
        bm._recount()
        return bm

    def _recount(self) -> None:
        """Rebuild the summary and the popcount from the words."""
        self._gc[:] = np.bitwise_count(self._rows).sum(axis=1, dtype=np.uint16)
        self._count = int(self._gc.sum(dtype=np.int64))

    def copy(self) -> Bitmap:
        other = Bitmap(self.nbits)
        other._words[:] = self._words
        other._gc[:] = self._gc
        other._count = self._count
        return other

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Bitmap):
            return NotImplemented
        return self.nbits == other.nbits and bool(np.array_equal(self._words, other._words))

    __hash__ = None  # type: ignore[assignment]

    def group_counts(self) -> list[int]:
        """The summary level: set bits per group of :data:`GROUP_BITS` bits (the last group
        may be shorter). Always equal to a recount of the words."""
        counts: list[int] = self._gc.tolist()
        return counts

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
        if not 0 <= start <= end <= self.nbits:
            self._check(start, end)
        if start == end:
            return 0
        arr = self._arr
        ws, we = start >> 6, (end - 1) >> 6
        if ws == we:  # one word (a request's range, usually): no helper frames
            return (arr[ws] & (((1 << (end - start)) - 1) << (start & 63))).bit_count()
        total = (arr[ws] & _mask(start & 63, 64)).bit_count()
        total += (arr[we] & _mask(0, ((end - 1) & 63) + 1)).bit_count()
        if we > ws + 1:
            total += self._count_words(ws + 1, we)
        return total

    def _count_words(self, a: int, b: int) -> int:
        """Set bits in words ``[a, b)``: whole groups from the summary, the rest counted."""
        ga, gb = -(-a // GROUP_WORDS), b // GROUP_WORDS
        if ga >= gb:
            return int(np.bitwise_count(self._words[a:b]).sum())
        total = int(self._gc[ga:gb].sum(dtype=np.int64))
        if a < ga * GROUP_WORDS:
            total += int(np.bitwise_count(self._words[a : ga * GROUP_WORDS]).sum())
        if gb * GROUP_WORDS < b:
            total += int(np.bitwise_count(self._words[gb * GROUP_WORDS : b]).sum())
        return total

    def all_set(self, start: int, end: int) -> bool:
        return self.count_range(start, end) == end - start

    def all_clear(self, start: int, end: int) -> bool:
        return self.count_range(start, end) == 0

    # -- range updates -----------------------------------------------------------------

    def set_range(self, start: int, end: int) -> None:
        self._update(start, end, True)

    def clear_range(self, start: int, end: int) -> None:
        self._update(start, end, False)

    def clear_all(self) -> None:
        self._words[:] = 0
        self._gc[:] = 0
        self._count = 0

    def _update(self, start: int, end: int, value: bool) -> None:
        if not 0 <= start <= end <= self.nbits:
            self._check(start, end)
        if start == end:
            return
        ws, we = start >> 6, (end - 1) >> 6
        if ws == we:  # one word: _update_word() inline
            arr = self._arr
            mask = ((1 << (end - start)) - 1) << (start & 63)
            old = arr[ws]
            new = (old | mask) if value else (old & ~mask)
            if new != old:
                delta = new.bit_count() - old.bit_count()
                arr[ws] = new
                self._gcount[ws >> 6] += delta
                self._count += delta
            return
        self._update_word(ws, _mask(start & 63, 64), value)
        self._update_word(we, _mask(0, ((end - 1) & 63) + 1), value)
        if we > ws + 1:
            self._update_words(ws + 1, we, value)

    def _update_word(self, i: int, mask: int, value: bool) -> None:
        old = self._arr[i]
        new = (old | mask) if value else (old & ~mask & _ALL)
        if new != old:
            delta = new.bit_count() - old.bit_count()
            self._arr[i] = new
            self._gcount[i >> 6] += delta
            self._count += delta

    def _update_words(self, a: int, b: int, value: bool) -> None:
        """Words ``[a, b)`` to all ones or zeros, summary and popcount kept exact."""
        words, gc = self._words, self._gc
        fill = _ALL if value else 0
        ga, gb = -(-a // GROUP_WORDS), b // GROUP_WORDS
        pieces = [(a, b)] if ga > gb else [(a, ga * GROUP_WORDS), (gb * GROUP_WORDS, b)]
        for x, y in pieces:
            if x < y:
                before = int(np.bitwise_count(words[x:y]).sum())
                after = 64 * (y - x) if value else 0
                self._gcount[x >> 6] += after - before
                self._count += after - before
        if ga < gb:
            before = int(gc[ga:gb].sum(dtype=np.int64))
            after = GROUP_BITS * (gb - ga) if value else 0
            gc[ga:gb] = GROUP_BITS if value else 0
            self._count += after - before
        words[a:b] = fill

    # -- runs ---------------------------------------------------------------------------

    def runs(self, start: int, end: int, value: bool = True) -> Iterator[tuple[int, int]]:
        """Maximal runs ``(run_start, run_end)`` of bits equal to ``value`` inside
        ``[start, end)``, clipped to it, ascending."""
        self._check(start, end)
        if start == end:
            return
        inside = self.get(start) == value
        open_start = start if inside else -1
        for pl in self._transitions(start, end):
            if open_start >= 0:
                starts = [open_start, *pl[1::2]]
                ends = pl[0::2]
            else:
                starts = pl[0::2]
                ends = pl[1::2]
            open_start = starts[-1] if len(starts) > len(ends) else -1
            yield from zip(starts, ends)  # noqa: B905  (starts may hold one pending run)
        if open_start >= 0:
            yield open_start, end

    def _transitions(self, start: int, end: int) -> Iterator[list[int]]:
        """Ascending positions ``p`` in ``(start, end)`` with ``bit[p] != bit[p - 1]``, in
        non-empty lists of at most ``_CHUNK_GROUPS`` groups' worth of words each."""
        g0, g1 = start // GROUP_BITS, (end - 1) // GROUP_BITS + 1
        gc = self._gc[g0:g1]
        state = _STATE[gc]
        if g1 == len(self._gc) and self._last_cap != GROUP_BITS:
            last = int(gc[-1])
            state[-1] = 0 if last == 0 else (2 if last == self._last_cap else 1)
        # Transitions lie only inside mixed groups or at the first bit of a group whose
        # state differs from its predecessor's.
        candidate = state == 1
        candidate[1:] |= state[1:] != state[:-1]
        groups = np.flatnonzero(candidate)
        if not len(groups):
            return
        groups += g0
        if len(groups) <= _FEW_GROUPS:
            few = self._few_transitions(groups.tolist(), start, end)
            if few is not None:
                if few:
                    yield few
                return
        rows_of = self._rows
        for c in range(0, len(groups), _CHUNK_GROUPS):
            chunk = groups[c : c + _CHUNK_GROUPS]
            first = int(chunk[0])
            if int(chunk[-1]) - first + 1 == len(chunk):
                rows = rows_of[first : first + len(chunk)]
            else:
                rows = rows_of[chunk]
            # Words outside the range give positions outside (start, end): filtered below.
            prev = np.empty_like(rows)
            prev[:, 1:] = rows[:, :-1] >> _SHIFT63
            prev[:, 0] = rows_of[chunk - 1, GROUP_WORDS - 1] >> _SHIFT63
            if not first:
                prev[0, 0] = 0
            t = (rows ^ ((rows << _ONE) | prev)).ravel()
            nz = np.flatnonzero(t)
            if not len(nz):
                continue
            bases = (chunk[nz >> 6] << 12) + ((nz & 63) << 6)
            if len(nz) <= _FEW_WORDS:
                pl: list[int] = []
                for x, base in zip(t[nz].tolist(), bases.tolist(), strict=True):
                    while x:
                        low = x & -x
                        pl.append(base + low.bit_length() - 1)
                        x ^= low
                if pl[0] <= start or pl[-1] >= end:
                    pl = [p for p in pl if start < p < end]
            else:
                bits = np.flatnonzero(np.unpackbits(t[nz].view(np.uint8), bitorder="little"))
                pos = bases[bits >> 6] + (bits & 63)
                if pos[0] <= start or pos[-1] >= end:
                    pos = pos[(pos > start) & (pos < end)]
                pl = pos.tolist()
            if pl:
                yield pl

    def _few_transitions(self, groups: list[int], start: int, end: int) -> list[int] | None:
        """The transitions in ``(start, end)`` of the candidate ``groups`` (ascending), if
        each group holds at most one transition inside it; None as soon as one does not
        (the caller then takes the general path).

        A group with one inner transition at bit ``k`` is its first bit repeated ``k``
        times, then the other value: ``k`` follows from the group's count, and three
        comparisons of its bytes (C memcmp) confirm it, so a few-run map costs a few
        hundred nanoseconds per candidate group instead of numpy calls.
        """
        arr, raw, gcount = self._arr, self._raw, self._gcount
        last_group = len(gcount) - 1
        pl: list[int] = []
        for g in groups:
            w0 = g << 6
            first = arr[w0] & 1
            if (arr[w0 - 1] >> 63 if w0 else 0) != first:
                pl.append(g << 12)
            c = gcount[g]
            if c == 0 or c == GROUP_BITS:
                continue
            if g == last_group and self._last_cap != GROUP_BITS:
                return None
            k = c if first else GROUP_BITS - c
            wk, r = k >> 6, k & 63
            fill, other = (_ONES, _ZEROS) if first else (_ZEROS, _ONES)
            b0 = w0 << 3
            if not fill.startswith(raw[b0 : b0 + (wk << 3)]):
                return None
            rest = wk
            if r:
                low = (1 << r) - 1
                if arr[w0 + wk] != (low if first else _ALL ^ low):
                    return None
                rest += 1
            if not other.startswith(raw[b0 + (rest << 3) : b0 + (GROUP_WORDS << 3)]):
                return None
            pl.append((g << 12) + k)
        if pl and (pl[0] <= start or pl[-1] >= end):
            pl = [p for p in pl if start < p < end]
        return pl


def _mask(lo: int, hi: int) -> int:
    """Bits lo..hi-1 of a 64-bit word."""
    return ((1 << (hi - lo)) - 1) << lo
