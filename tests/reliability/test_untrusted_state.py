"""State-image regression test for the bug the ``vmem-state`` fuzz target found."""

from __future__ import annotations

import struct
import zlib

import pytest

from ramdiscard.providers.virtio_mem import StateError, StateImage, decode_state, encode_state
from ramdiscard.units import GiB, MiB


def test_state_image_with_reserved_flags_is_rejected() -> None:
    image = encode_state(StateImage(4 * GiB, 64 * MiB, 2 * MiB, 0, 64 * MiB, 0, 0, bytes(4)))
    decode_state(image)
    body = bytearray(image[:-4])
    struct.pack_into("<H", body, 10, 1)
    bad = bytes(body) + struct.pack("<I", zlib.crc32(body))
    with pytest.raises(StateError, match="flags"):
        decode_state(bad)
