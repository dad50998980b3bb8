"""Run lists: ascending, non-overlapping ``(start, length)`` byte ranges of a RAM region,
and :class:`Coverage`, a mutable set of them (pure, no I/O). Precopy keeps the populated
and freshly plugged runs of each region in them; the live destination keeps what it
received."""

from __future__ import annotations

from bisect import bisect_left, bisect_right

Runs = list[tuple[int, int]]
"""Ascending ``(start, length)`` runs."""


def merge(a: Runs, b: Runs) -> Runs:
    """Union of two ascending run lists, as ascending maximal runs."""
    out: Runs = []
    for s, n in sorted(a + b):
        if out and s <= out[-1][0] + out[-1][1]:
            ps, pn = out[-1]
            out[-1] = (ps, max(pn, s + n - ps))
        else:
            out.append((s, n))
    return out


def subtract(a: Runs, b: Runs) -> Runs:
    """Parts of runs ``a`` outside runs ``b`` (both ascending and disjoint; linear)."""
    out: Runs = []
    j = 0
    for s, n in a:
        pos, end = s, s + n
        while j < len(b) and b[j][0] + b[j][1] <= pos:
            j += 1
        k = j
        while k < len(b) and b[k][0] < end:
            bs, bn = b[k]
            if bs > pos:
                out.append((pos, bs - pos))
            pos = max(pos, bs + bn)
            k += 1
        if pos < end:
            out.append((pos, end - pos))
    return out


class Coverage:
    """Disjoint ascending byte ranges received so far (one per region)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, start: int, end: int) -> None:
        i = bisect_left(self.ends, start)
        j = bisect_right(self.starts, end)
        if i < j:
            start = min(start, self.starts[i])
            end = max(end, self.ends[j - 1])
        self.starts[i:j] = [start]
        self.ends[i:j] = [end]

    def remove(self, start: int, end: int) -> None:
        keep_s: list[int] = []
        keep_e: list[int] = []
        i = bisect_right(self.ends, start)
        j = bisect_left(self.starts, end)
        for s, e in zip(self.starts[i:j], self.ends[i:j], strict=True):
            if s < start:
                keep_s.append(s)
                keep_e.append(start)
            if e > end:
                keep_s.append(end)
                keep_e.append(e)
        self.starts[i:j] = keep_s
        self.ends[i:j] = keep_e

    def runs(self) -> Runs:
        return [(s, e - s) for s, e in zip(self.starts, self.ends, strict=True)]

    def clip(self, start: int, end: int) -> Runs:
        """The covered parts of ``[start, end)``, ascending."""
        out: Runs = []
        i = bisect_right(self.ends, start)
        while i < len(self.starts) and self.starts[i] < end:
            s, e = max(start, self.starts[i]), min(end, self.ends[i])
            if s < e:
                out.append((s, e - s))
            i += 1
        return out

    def covers(self, start: int, end: int) -> bool:
        i = bisect_right(self.starts, start) - 1
        return start == end or (i >= 0 and self.ends[i] >= end)
