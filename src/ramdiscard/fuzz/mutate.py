"""Input mutation for the coverage-less fuzzer (pure functions of an input and a PRNG).

Rules:

* A mutator never returns more than ``max_size`` bytes and never raises.
* Mutations are the classic dumb-fuzzer set, chosen because they reach the checks that
  guard untrusted input: bit flips, random bytes, "interesting" integers written little-
  endian at any offset (0, 1, powers of two and their neighbours, all-ones of 8/16/32/64
  bits), small arithmetic on a field, insert/delete/duplicate a span, truncation, and
  splicing with another corpus entry. Text mutations (for line-oriented formats) add
  line duplication/deletion/swaps, digit-run inflation and separator damage.
* All randomness comes from the ``random.Random`` passed in, so a run is reproducible
  from its seed.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

_INTERESTING: tuple[int, ...] = (
    0,
    1,
    2,
    0x7F,
    0x80,
    0xFF,
    0x100,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x10000,
    0x200000,
    0x7FFFFFFF,
    0x80000000,
    0xFFFFFFFF,
    1 << 32,
    1 << 40,
    (1 << 63) - 1,
    1 << 63,
    (1 << 64) - 1,
    (1 << 64) - 0x200000,
)
_WIDTHS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def _put_int(buf: bytearray, pos: int, width: int, value: int) -> None:
    raw = struct.pack(_WIDTHS[width], value & ((1 << (8 * width)) - 1))
    end = min(len(buf), pos + width)
    buf[pos:end] = raw[: end - pos]


def mutate_bytes(data: bytes, rng: random.Random, corpus: Sequence[bytes], max_size: int) -> bytes:
    """One to four stacked random mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(11)
        n = len(buf)
        if n == 0 or choice == 0:
            pos = rng.randint(0, n)
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif choice == 1:
            pos = rng.randrange(n)
            buf[pos] ^= 1 << rng.randrange(8)
        elif choice == 2:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif choice in (3, 4):
            width = rng.choice((1, 2, 4, 8))
            _put_int(buf, rng.randrange(n), width, rng.choice(_INTERESTING))
        elif choice == 5:
            width = rng.choice((1, 2, 8))
            pos = rng.randrange(n)
            fmt = _WIDTHS[width]
            chunk = bytes(buf[pos : pos + width]).ljust(width, b"\0")
            (value,) = struct.unpack(fmt, chunk)
            _put_int(buf, pos, width, value + rng.randint(-16, 16))
        elif choice == 6:
            start = rng.randrange(n)
            del buf[start : start + rng.randint(1, max(1, n // 4))]
        elif choice == 7:
            start = rng.randrange(n)
            span = bytes(buf[start : start + rng.randint(1, 32)])
            pos = rng.randint(0, n)
            buf[pos:pos] = span * rng.randint(1, 4)
        elif choice == 8:
            del buf[rng.randint(0, n) :]
        elif choice == 9 and corpus:
            other = rng.choice(corpus)
            if other:
                cut_a = rng.randint(0, n)
                cut_b = rng.randint(0, len(other))
                buf = buf[:cut_a] + bytearray(other[cut_b:])
        else:
            start = rng.randrange(n)
            length = rng.randint(1, 8)
            buf[start : start + length] = bytes(length)
    return bytes(buf[:max_size])


def mutate_text(data: bytes, rng: random.Random, corpus: Sequence[bytes], max_size: int) -> bytes:
    """Line-aware mutations for text formats, mixed with byte mutations."""
    if rng.random() < 0.3:
        return mutate_bytes(data, rng, corpus, max_size)
    lines = data.split(b"\n")
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(8)
        i = rng.randrange(len(lines))
        line = lines[i]
        if choice == 0:
            lines.insert(i, line)
        elif choice == 1 and len(lines) > 1:
            del lines[i]
        elif choice == 2:
            j = rng.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif choice == 3 and line:
            pos = rng.randrange(len(line))
            lines[i] = line[:pos] + b"9" * rng.choice((1, 5, 20, 400, 5000)) + line[pos:]
        elif choice == 4 and line:
            pos = rng.randrange(len(line))
            lines[i] = (
                line[:pos] + rng.choice((b"=", b" ", b"@", b":", b"0x", b"-", b"\t", b"\0")) + line[pos:]
            )
        elif choice == 5 and line:
            pos = rng.randrange(len(line))
            lines[i] = line[:pos]
        elif choice == 6 and corpus:
            other = rng.choice(corpus).split(b"\n")
            lines.insert(i, rng.choice(other))
        else:
            lines[i] = mutate_bytes(line, rng, (), 512)
    return b"\n".join(lines)[:max_size]
