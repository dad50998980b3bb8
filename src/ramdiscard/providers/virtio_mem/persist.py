"""Saving and loading a virtio-mem device's state for migration and snapshots.

Rules:

* The image is versioned and self-checking: magic ``RDVMEMST``, format version, the
  *sanity block* (addr, region size, block size, node), usable_region_size,
  requested_size, plugged size, the bitmap (one bit per block, little-endian words, as
  QEMU migrates it) and a CRC-32 of everything before it.
* Loading is all-or-nothing. A corrupt image (bad magic, version, reserved flags, length,
  checksum, padding bits, sizes that are not block multiples, plugged size that disagrees with the
  bitmap, plugged blocks outside the usable region) or one whose sanity block does not
  match the device (QEMU's -EINVAL) raises :class:`StateError` and changes nothing. So
  does loading into a device that has memory plugged (a destination starts empty).
* Applying a loaded bitmap (qemu-ram-discard §3.10): unplugged ranges are discarded again
  ("discarded means discarded"), plugged ranges are preallocated when ``prealloc`` is on,
  memslots holding plugged blocks are mapped, and populate is replayed to the listeners,
  one notification per plugged run. A listener refusal rolls everything back to
  all-unplugged (memory discarded again, listeners told, memslots unmapped, sizes
  restored) and raises StateError.

Theory of operation: the memslots are mapped *before* the new bitmap is installed, so a
listener that registers while they appear replays nothing, then receives the same regular
populate notification as every earlier listener: each block is announced exactly once.
(QEMU maps the memslots after installing the bitmap and then replays to every listener,
so a listener registered by the mapping hears about each block twice; qemu-ram-discard
§5.2.)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ramdiscard.errors import ProtocolViolation
from ramdiscard.providers.virtio_mem.wire import VirtioMemError
from ramdiscard.rdm.bitmap import Bitmap

if TYPE_CHECKING:
    from ramdiscard.providers.virtio_mem.device import VirtioMem

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


def image_of(device: VirtioMem) -> StateImage:
    """The device's current state (take the device lock to keep it stable)."""
    with device.lock:
        return StateImage(
            device.addr,
            device.region_size,
            device.block_size,
            device.node,
            device.usable_region_size,
            device.requested_size,
            device.plugged_size,
            device.bitmap_bytes(),
        )


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


def save_state(device: VirtioMem) -> bytes:
    """The device's state as an image (see the module rules)."""
    return encode_state(image_of(device))


def load_state(device: VirtioMem, data: bytes | bytearray | memoryview) -> None:
    """Load an image into a device with nothing plugged; all-or-nothing (module rules)."""
    image = decode_state(data)
    with device._topology_lock(), device.lock:
        device._check_realized()
        device._check_not_notifying("load device state")
        mine = (device.addr, device.region_size, device.block_size, device.node)
        if image.sanity() != mine:
            names = ("addr", "region size", "block size", "node")
            diffs = ", ".join(
                f"{n} {theirs:#x} != {ours:#x}"
                for n, theirs, ours in zip(names, image.sanity(), mine, strict=True)
                if theirs != ours
            )
            raise StateError(f"virtio-mem state does not match device {device.id!r}: {diffs}")
        if device.plugged_size:
            raise StateError(f"device {device.id!r} has memory plugged; load needs an empty device")
        try:
            bitmap = Bitmap.from_bytes(image.nb_blocks, image.bitmap)
        except ValueError as exc:
            raise StateError(f"virtio-mem state bitmap: {exc}") from exc
        shift = image.block_size.bit_length() - 1
        if bitmap.count << shift != image.plugged_size:
            raise StateError(
                f"virtio-mem state: plugged size {image.plugged_size:#x} disagrees with the bitmap "
                f"({bitmap.count} blocks)"
            )
        usable_blocks = image.usable_region_size >> shift
        if not bitmap.all_clear(usable_blocks, bitmap.nbits):
            raise StateError("virtio-mem state: plugged blocks outside the usable region")
        _apply(device, image, bitmap, shift)


def _apply(device: VirtioMem, image: StateImage, bitmap: Bitmap, shift: int) -> None:
    ram = device.ram
    plugged = [(s << shift, (e - s) << shift) for s, e in bitmap.runs(0, bitmap.nbits, True)]
    unplugged = [(s << shift, (e - s) << shift) for s, e in bitmap.runs(0, bitmap.nbits, False)]
    try:
        for offset, size in unplugged:
            ram.discard_range(offset, size)
    except Exception as exc:
        raise StateError(f"virtio-mem load: discarding unplugged memory failed: {exc}") from exc
    if device.prealloc:
        try:
            for offset, size in plugged:
                ram.populate(offset, size)
        except Exception as exc:
            _discard_quietly(device, plugged)
            raise StateError(f"virtio-mem load: preallocation failed: {exc}") from exc

    old = (device._usable_region_size, device._requested_size)
    device._usable_region_size = image.usable_region_size
    device._requested_size = image.requested_size
    mapped: list[int] = []
    try:
        device._map_plugged_memslots(bitmap, mapped)
        device._notify_populate_runs(plugged)  # all-or-nothing: a refusal is rolled back
    except Exception as exc:
        device._unmap_memslots(mapped)
        device._usable_region_size, device._requested_size = old
        _discard_quietly(device, plugged)
        raise StateError(f"virtio-mem load: a listener refused the restored memory: {exc!r}") from exc
    device._bitmap = bitmap  # its popcount is the plugged size (checked against the image)
    if image.plugged_size:
        device._fire_size_change()


def _discard_quietly(device: VirtioMem, ranges: list[tuple[int, int]]) -> None:
    for offset, size in ranges:
        device._rediscard(offset, size)
