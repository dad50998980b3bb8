"""Postcopy's messages after the switchover (sans-I/O; format in ``docs/migration-format.md``).

Rules:

* The main channel starts with :data:`MAIN_PREAMBLE`, then a stop-and-copy stream
  without pages (stream header, REGION table, DEVICE states, END): what the destination
  checks and loads before its guest runs. Page messages follow on the same channel.
* The priority channel (a second connection to the same address) starts with
  :data:`PRIORITY_HELLO`. The destination sends ``RQ`` on it; the source answers with
  ``PG``/``ZR`` on it (``postcopy-preempt``) or on the main channel.
* Every message is :data:`MSG` (kind, region, offset, length), ``PG`` followed by
  ``length`` bytes of page data. ``PG``: pages of a plugged range. ``ZR``: the range is
  not populated on the source (the destination places zero pages). ``RQ``: the
  destination asks for a range. ``DN``: the background copy is complete, ``offset`` =
  the page bytes it sent on the main channel.
* :func:`check` refuses a message whose kind is unknown for the channel, or whose range
  is misaligned, longer than :data:`MAX_PIECE`, or outside its region, before anything
  is read for it or placed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final

from ramdiscard.migration.stream import StreamError, quote

MAIN_PREAMBLE: Final = b"RDPOSTCP"
PRIORITY_HELLO: Final = b"RDPOSTPR"
MSG: Final = struct.Struct("<2s2xIQQ")
PAGE: Final = 4096
MAX_PIECE: Final = 1 << 20
PG: Final = b"PG"
ZR: Final = b"ZR"
RQ: Final = b"RQ"
DN: Final = b"DN"


def encode(kind: bytes, region: int, offset: int, length: int) -> bytes:
    return MSG.pack(kind, region, offset, length)


def check(
    raw: bytes | bytearray | memoryview, kinds: bytes, sizes: Sequence[int]
) -> tuple[bytes, int, int, int]:
    """Decode one message header; ``kinds`` are the two-letter kinds allowed here (concatenated),
    ``sizes`` the region sizes. Raises StreamError (module rules)."""
    kind, region, offset, length = MSG.unpack(raw)
    if kind not in {kinds[i : i + 2] for i in range(0, len(kinds), 2)}:
        raise StreamError(f"postcopy: unexpected message kind {quote(kind)}")
    if kind == DN:
        return kind, region, offset, length
    if region >= len(sizes):
        raise StreamError(f"postcopy: region index {region} out of range ({len(sizes)} regions)")
    if (offset | length) % PAGE or not 0 < length <= MAX_PIECE or offset + length > sizes[region]:
        raise StreamError(
            f"postcopy: range [{offset:#x}, +{length:#x}) of region {region} is misaligned, "
            f"longer than {MAX_PIECE:#x} or outside the region"
        )
    return kind, region, offset, length
