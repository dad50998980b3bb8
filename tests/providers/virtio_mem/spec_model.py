"""An independent model of a virtio-mem device: a set of plugged block indexes.

Written from /work/shared/spec/virtio-mem.md (D-* ids), not from the device code, and
used to predict every response and the 56-byte config of the device under test.

Choices the spec leaves open, fixed here as this project's contract (QEMU's behaviour):

* The answer to PLUG is decided in this order: range not valid (D-PLUG-3/4/5) -> ERROR;
  plugged_size + size > requested_size ("plug requests will be rejected" once the request
  is met; NACK by the convention every peer but Firecracker follows) -> NACK; a block
  already plugged (D-PLUG-6) -> ERROR; the host cannot do it now (busy, host failure,
  listener refusal, D-PLUG-7) -> BUSY; else ACK.
* UNPLUG: invalid range -> ERROR; a block not plugged -> ERROR; cannot now -> BUSY; ACK.
* UNPLUG_ALL: nothing plugged -> ACK; cannot now -> BUSY; else ACK with nothing plugged.
  On ACK the usable region is resized to fit ``requested_size`` (D-UA-6, the only shrink).
* The usable region is ``requested_size + extent`` rounded up to the block size and
  clamped to the region (0 when nothing is requested): it grows on requested-size
  changes, never shrinks then (D-CFG-8), and always covers requested_size (D-CFG-4).
* A request shorter than 24 bytes or of an unknown type gets no answer and breaks the
  device until a reset; a broken device answers nothing.
* System reset (not a wake-up) unplugs everything like UNPLUG_ALL (a BUSY outcome is
  ignored) and clears broken; device reset only clears broken (D-INIT-2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

ACK, NACK, BUSY, ERROR = 0, 1, 2, 3
PLUGGED, UNPLUGGED, MIXED = 0, 1, 2
PLUG, UNPLUG, UNPLUG_ALL, STATE = 0, 1, 2, 3


class Broken(Exception):
    """The model's "no answer": a protocol violation, or any request while broken."""


@dataclass
class SpecModel:
    addr: int
    block_size: int
    region_size: int
    requested_size: int
    extent: int
    node_id: int = 0
    plugged: set[int] = field(default_factory=set)
    broken: bool = False
    usable_region_size: int = 0

    def __post_init__(self) -> None:
        self.usable_region_size = self._fit(self.requested_size)

    def _fit(self, requested: int) -> int:
        if requested == 0:
            return 0
        bs = self.block_size
        return min(self.region_size, -(-(requested + self.extent) // bs) * bs)

    @property
    def plugged_size(self) -> int:
        return len(self.plugged) * self.block_size

    def _blocks(self, addr: int, nb: int) -> range | None:
        """The block indexes of a valid range, None if it is not valid."""
        bs = self.block_size
        if addr % bs or nb <= 0 or addr < self.addr or addr + nb * bs > self.addr + self.usable_region_size:
            return None
        first = (addr - self.addr) // bs
        return range(first, first + nb)

    def plug(self, addr: int, nb: int, *, can: bool = True) -> int:
        blocks = self._blocks(addr, nb)
        if blocks is None:
            return ERROR
        if self.plugged_size + nb * self.block_size > self.requested_size:
            return NACK
        if any(b in self.plugged for b in blocks):
            return ERROR
        if not can:
            return BUSY
        self.plugged.update(blocks)
        return ACK

    def unplug(self, addr: int, nb: int, *, can: bool = True) -> int:
        blocks = self._blocks(addr, nb)
        if blocks is None or not all(b in self.plugged for b in blocks):
            return ERROR
        if not can:
            return BUSY
        self.plugged.difference_update(blocks)
        return ACK

    def unplug_all(self, *, can: bool = True) -> int:
        if self.plugged and not can:
            return BUSY
        self.plugged.clear()
        self.usable_region_size = self._fit(self.requested_size)
        return ACK

    def state(self, addr: int, nb: int) -> tuple[int, int | None]:
        blocks = self._blocks(addr, nb)
        if blocks is None:
            return ERROR, None
        n = sum(1 for b in blocks if b in self.plugged)
        return ACK, PLUGGED if n == nb else UNPLUGGED if n == 0 else MIXED

    def set_requested(self, value: int) -> None:
        self.requested_size = value
        self.usable_region_size = max(self.usable_region_size, self._fit(value))

    def device_reset(self) -> None:
        self.broken = False

    def system_reset(self, *, wakeup: bool, can: bool = True) -> None:
        if wakeup:
            return
        self.unplug_all(can=can)
        self.broken = False

    def request(self, data: bytes) -> tuple[int, int | None]:
        """Answer raw request bytes: (response type, state or None); raises Broken."""
        if self.broken:
            raise Broken
        if len(data) < 24:
            self.broken = True
            raise Broken
        rtype, addr, nb = struct.unpack_from("<H6xQH", data)
        if rtype == PLUG:
            return self.plug(addr, nb), None
        if rtype == UNPLUG:
            return self.unplug(addr, nb), None
        if rtype == UNPLUG_ALL:
            return self.unplug_all(), None
        if rtype == STATE:
            return self.state(addr, nb)
        self.broken = True
        raise Broken

    def config(self) -> bytes:
        return struct.pack(
            "<QH6xQQQQQ",
            self.block_size,
            self.node_id,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )
