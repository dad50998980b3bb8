"""The virtio-mem device state image: a pure codec (no device, no memory).

Rules:

* The image is versioned and self-checking: magic ``RDVMEMST``, format version, the
  *sanity block* (addr, region size, block size, node), usable_region_size,
  requested_size, plugged size, the bitmap (one bit per block, little-endian words, as
  QEMU migrates it) and a CRC-32 of everything before it.
* :func:`decode_state` checks an image for internal consistency only (magic, version,
  reserved flags, length, checksum, power-of-two block size, block-multiple sizes, bitmap
  length, usable/requested sizes within the region) and raises :class:`StateError` naming
  the first problem. Whether an image fits a device, and applying it, is the device's
  (:meth:`VirtioMem.restore <ramdiscard.providers.virtio_mem.device.VirtioMem.restore>`):
  padding bits, plugged size against the bitmap, plugged blocks inside the usable region
  and the sanity block are checked there, all before anything changes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from ramdiscard.errors import ProtocolViolation
from ramdiscard.providers.virtio_mem.wire import VirtioMemError

MAGIC = b"RDVMEMST"
VERSION = 1
_HEADER = struct.Struct("<8sHHQQQIQQQQ")
_CRC = struct.Struct("<I")


class StateError(VirtioMemError, ProtocolViolation):
    """A device state image is corrupt or does not fit the device; nothing changed."""


@dataclass(frozen=True, slots=True)
class StateImage:
    """Decoded device state. ``bitmap`` holds ``region_size // block_size`` bits."""

    addr: int
    region_size: int
    block_size: int
    node: int
    usable_region_size: int
    requested_size: int
    plugged_size: int
    bitmap: bytes

    @property
    def nb_blocks(self) -> int:
        return self.region_size // self.block_size

    def sanity(self) -> tuple[int, int, int, int]:
        """The fields that must match on the destination: addr, region, block size, node."""
        return self.addr, self.region_size, self.block_size, self.node


def encode_state(image: StateImage) -> bytes:
    """Serialise an image (magic, version, fields, bitmap, CRC-32)."""
    body = (
        _HEADER.pack(
            MAGIC,
            VERSION,
            0,
            image.addr,
            image.region_size,
            image.block_size,
            image.node,
            image.usable_region_size,
            image.requested_size,
            image.plugged_size,
            image.nb_blocks,
        )
        + image.bitmap
    )
    return body + _CRC.pack(zlib.crc32(body))


def decode_state(data: bytes | bytearray | memoryview) -> StateImage:
    """Parse and check an image for internal consistency. Raises StateError."""
    data = bytes(data)
    if len(data) < _HEADER.size + _CRC.size:
        raise StateError(f"virtio-mem state too short: {len(data)} bytes")
    (magic, version, flags, addr, region_size, block_size, node, usable, requested, plugged, nbits) = (
        _HEADER.unpack_from(data)
    )
    if magic != MAGIC:
        raise StateError(f"not a virtio-mem state image (magic {magic!r})")
    if version != VERSION:
        raise StateError(f"unsupported virtio-mem state version {version} (this is version {VERSION})")
    if flags:
        raise StateError(f"virtio-mem state: unknown flags {flags:#x} (reserved, must be 0)")
    bitmap_len = (nbits + 7) // 8
    if len(data) != _HEADER.size + bitmap_len + _CRC.size:
        raise StateError(
            f"virtio-mem state length {len(data)} does not match a {nbits}-block bitmap "
            f"({_HEADER.size + bitmap_len + _CRC.size} bytes expected)"
        )
    body, (crc,) = data[: -_CRC.size], _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(body) != crc:
        raise StateError("virtio-mem state checksum mismatch (corrupt image)")
    if block_size <= 0 or block_size & (block_size - 1):
        raise StateError(f"virtio-mem state: block size {block_size:#x} is not a power of two")
    for name, value in (
        ("addr", addr),
        ("region size", region_size),
        ("usable region size", usable),
        ("requested size", requested),
        ("plugged size", plugged),
    ):
        if value % block_size:
            raise StateError(f"virtio-mem state: {name} {value:#x} is not a multiple of {block_size:#x}")
    if nbits != region_size // block_size:
        raise StateError(f"virtio-mem state: {nbits} bitmap bits for a {region_size:#x} region")
    if usable > region_size or requested > region_size:
        raise StateError("virtio-mem state: usable/requested size exceeds the region size")
    return StateImage(addr, region_size, block_size, node, usable, requested, plugged, body[_HEADER.size :])


def check_sanity(image: StateImage, mine: tuple[int, int, int, int], what: str) -> None:
    """Raise StateError naming every differing field unless the image's sanity block (addr,
    region size, block size, node) equals ``mine`` (QEMU's -EINVAL on load)."""
    if image.sanity() == mine:
        return
    names = ("addr", "region size", "block size", "node")
    diffs = ", ".join(
        f"{n} {theirs:#x} != {ours:#x}"
        for n, theirs, ours in zip(names, image.sanity(), mine, strict=True)
        if theirs != ours
    )
    raise StateError(f"virtio-mem state does not match {what}: {diffs}")
