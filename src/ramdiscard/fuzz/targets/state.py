"""Device-state (migration/snapshot image) fuzzing: target ``vmem-state``.

Input: one config byte, then a state image. Config bit0 adds a listener that refuses
block 3, bit1 makes the destination preallocate, bit2 arms a one-shot host fault on the
``(cfg >> 3) + 1``-th host operation of the load. The mutator re-seals the CRC-32 of most
mutants, so the checks behind the checksum get exercised too.

Documented outcomes of :meth:`VirtioMem.load_state`: success, after which the device
equals the image and every invariant holds; or :class:`StateError` with *nothing
changed*: nothing plugged, listeners told nothing net, no host memory resident.

The migration stream of :mod:`ramdiscard.migration` gets its own target here once that
module is present (:func:`extra_targets`).
"""

from __future__ import annotations

import errno
import random
import struct
import zlib
from collections.abc import Hashable, Sequence

from ramdiscard import faults
from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.invariants import PAGE, ViewListener, check_device, check_residency
from ramdiscard.fuzz.mutate import mutate_bytes
from ramdiscard.fuzz.targets.virtio import ADDR, BS, NB, SIZE, new_ram
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import StateError, StateImage, VirtioMem, encode_state
from ramdiscard.rdm import DiscardPolicy


class StateHarness:
    def __init__(self) -> None:
        self.ram = new_ram(SIZE)
        self.policy = DiscardPolicy()
        self.dev: VirtioMem | None = None
        self.listeners: list[ViewListener] = []

    def _teardown(self) -> None:
        dev, self.dev = self.dev, None
        if dev is not None:
            for lst in dev.listeners:
                dev.unregister_listener(lst)
            dev.unrealize()

    def close(self) -> None:
        try:
            self._teardown()
        finally:
            self.ram.close()

    def deep_check(self) -> None:
        if self.dev is not None:
            check_residency(self.dev)

    def run(self, data: bytes) -> Hashable:
        self._teardown()
        cfg = data[0] if data else 0
        image = data[1:]
        mr = MemoryRegion.new_ram("fuzz-dst", self.ram)
        self.dev = dev = VirtioMem(
            mr, addr=ADDR, block_size=BS, requested_size=0, policy=self.policy, prealloc=bool(cfg & 2)
        )
        self.listeners = [ViewListener(block_size=BS, name="full")]
        if cfg & 1:
            self.listeners.append(ViewListener(block_size=BS, refuse_blocks=frozenset({3}), name="refuse"))
        for lst in self.listeners:
            dev.register_listener(lst, MemoryRegionSection(mr, 0, SIZE, ADDR))
        before = (dev.requested_size, dev.usable_region_size)
        try:
            if cfg & 4:
                with faults.inject(None, nth=(cfg >> 3) + 1, errno=errno.EIO):
                    dev.load_state(image)
            else:
                dev.load_state(image)
        except StateError as exc:
            check_device(dev, self.listeners)
            assert dev.plugged_size == 0 and (dev.requested_size, dev.usable_region_size) == before
            assert all(not lst.view.any() for lst in self.listeners)
            check_residency(dev)
            return ("error", str(exc).split(":")[0][:40])
        check_device(dev, self.listeners)
        assert dev.save_state() == bytes(image), "a loaded image does not save back identically"
        return ("ok", dev.plugged_size // BS > 0, dev.usable_region_size == SIZE)


def _image(bits: Sequence[int], requested: int, usable: int) -> bytes:
    bitmap = bytearray(NB // 8)
    for b in bits:
        bitmap[b // 8] |= 1 << (b % 8)
    return encode_state(StateImage(ADDR, SIZE, BS, 0, usable, requested, len(bits) * BS, bytes(bitmap)))


def _seeds() -> list[bytes]:
    return [
        b"\x00" + _image([0, 1, 2, 9], 16 * BS, SIZE),
        b"\x01" + _image([3, 4], 8 * BS, 10 * BS),
        b"\x02" + _image(list(range(NB)), SIZE, SIZE),
        b"\x0c" + _image([5, 6, 7, 20], 8 * BS, SIZE),
        b"\x00" + _image([], 0, 0),
    ]


def _mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes], max_size: int) -> bytes:
    out = bytearray(mutate_bytes(data, rng, corpus, max_size))
    if len(out) > 5 and rng.random() < 0.8:
        body = bytes(out[1:-4])
        out[-4:] = struct.pack("<I", zlib.crc32(body))
    return bytes(out)


STATE_TARGET = Target(
    "vmem-state",
    "virtio-mem device-state images (migration/snapshot) loaded into a device with listeners",
    _seeds,
    StateHarness,
    mutate=_mutate,
    max_size=512,
)

assert PAGE  # re-exported geometry is shared with the virtio targets


def extra_targets() -> list[Target]:
    """Targets for modules that are not on every branch (migration stream)."""
    return []
