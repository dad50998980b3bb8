"""GuestDriver: a sans-I/O model of the Linux virtio-mem driver (``drivers/virtio/virtio_mem.c``).

Rules (virtio-mem.md §2; R-* ids of §1):

* The driver talks to the device only through bytes: it reads the 56-byte config space
  with ``device.config_bytes()`` and sends requests over a virtqueue
  (:attr:`GuestDriver.queue`, an in-process :class:`~ramdiscard.virtqueue.LocalVirtqueue`
  whose kick runs ``device.process_queue``): each request is one element of 24
  device-readable bytes and a 10-byte device-writable response buffer, as Linux adds them.
  It never writes the config (R-CFG-1) and ignores padding and, for
  PLUG/UNPLUG/UNPLUG_ALL, everything but the response type (R-PLUG-1, R-UNPLUG-1,
  R-UA-1). Its wire codec is its own, independent of the device's (:mod:`.codec`).
* One request in flight: :meth:`GuestDriver.step` sends at most one request and handles
  its response before returning.
* Mode: the sub-block size is ``max(block_size, pageblock)`` (2 MiB). Below the Linux
  memory block size (128 MiB) the driver runs in sub-block mode (SBM): memory is managed
  per 128 MiB memory block and plugged per sub-block. Otherwise big-block mode (BBM) with
  big blocks of ``max(block_size, memory block)``.
* Plug order, lowest address first. SBM: partially plugged memory blocks (ascending, the
  first unplugged sub-block upward, a contiguous run merged into one request), then empty
  memory blocks ascending, each plugged from sub-block 0 in one run of up to the whole
  block. BBM: unplugged big blocks ascending, one big block per request. Only whole
  memory (big) blocks inside the usable region are used.
* Unplug order, highest address first. SBM: partially plugged blocks first, then fully
  plugged ones, both in descending id order; a fully plugged block is unplugged in one
  request when at least a whole block must go, otherwise one sub-block per request from
  the highest one down (the online-memory path). BBM: plugged big blocks descending.
* Sizes: the amount to plug or unplug is ``|requested - plugged|`` rounded down to whole
  sub-blocks (big blocks); a remainder is never (un)plugged (R-OP-10).
* At start, if the device reports plugged memory, the first request is UNPLUG_ALL,
  repeated until ACKed (R-INIT-2). :meth:`request_unplug_all` models a driver reload.
* Responses: ACK updates the driver's own view. PLUG NACK: re-read the config and go
  again at once. BUSY (any request), UNPLUG NACK, any non-ACK/BUSY answer to UNPLUG_ALL
  and any unknown answer: arm the retry timer (50 s, doubling up to 300 s, reset after a
  successful request), read through the injectable ``clock``; nothing sleeps. ERROR to a
  PLUG or UNPLUG: the driver is broken and sends nothing more. A device that raises on
  the kick (protocol violation on its side) or leaves the request without a used entry
  also leaves the driver broken (Linux would wait for that answer forever).
* A config change (:meth:`config_changed`) makes the next step re-read the config and
  cancels a pending retry timer, as the driver's config interrupt does.

Theory of operation: the driver keeps one bit per *unit* (sub-block in SBM, big block in
BBM) of the device region, as a Python int, starting at the first memory-block-aligned
address of the region. Each step derives the next request from that bitmap, the last
config it read and the rules above, so the request sequence is a pure function of the
device's answers and the clock.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from ramdiscard.guest.codec import (
    MAX_NB_BLOCKS,
    RESPONSE_SIZE,
    Config,
    Exchange,
    ReqType,
    RespType,
    decode_response,
    encode_request,
)
from ramdiscard.guest.order import Next, next_plug, next_unplug
from ramdiscard.interfaces import Virtqueue
from ramdiscard.units import MiB
from ramdiscard.virtqueue import LocalVirtqueue

MEMORY_BLOCK_SIZE = 128 * MiB
"""Linux memory block size on x86-64."""
PAGEBLOCK_SIZE = 2 * MiB
"""Linux pageblock size on x86-64: the smallest sub-block current kernels use."""
RETRY_TIMER_MIN = 50.0
RETRY_TIMER_MAX = 300.0


class DriverState(StrEnum):
    CONVERGED = "converged"
    """Nothing to do until the requested size changes."""
    WORKING = "working"
    """The next step sends a request."""
    WAITING = "waiting"
    """The retry timer is armed; steps send nothing before it expires."""
    BROKEN = "broken"
    """An ERROR response (or a device failure) stopped the driver for good."""


class Device(Protocol):
    """What the driver sees of a virtio-mem device: its config space, and the handler the
    request queue's kick runs (it serves the queue's available elements)."""

    def config_bytes(self) -> bytes: ...

    def process_queue(self, vq: Virtqueue) -> object: ...


class Workload(Protocol):
    """Guest use of plugged memory (see :mod:`ramdiscard.guest.workload`)."""

    def plugged(self, gpa: int, size: int) -> None:
        """``[gpa, +size)`` was plugged; the guest may now use it."""

    def unplugging(self, gpa: int, size: int) -> None:
        """``[gpa, +size)`` is about to be unplugged; the guest stops using it."""

    def unplugged_all(self) -> None:
        """Everything was unplugged (UNPLUG_ALL)."""


class GuestDriver:
    """The Linux virtio-mem driver's request logic over ``device``; see the module rules.

    ``clock`` returns seconds (monotonic); it only drives the retry timer. ``workload`` is
    told about plugged and unplugged ranges. ``memory_block_size`` / ``pageblock_size``
    default to x86-64 Linux; ``force_bbm`` is the ``force_bbm`` module parameter.

    Raises ValueError if the device config is unusable (block size not a power of two,
    region not aligned to the block size).
    """

    def __init__(
        self,
        device: Device,
        *,
        clock: Callable[[], float] = time.monotonic,
        workload: Workload | None = None,
        memory_block_size: int = MEMORY_BLOCK_SIZE,
        pageblock_size: int = PAGEBLOCK_SIZE,
        force_bbm: bool = False,
    ) -> None:
        self.device = device
        self.queue = LocalVirtqueue(device.process_queue)
        """The request queue (driver side); its kick runs ``device.process_queue``."""
        self.clock = clock
        self.workload = workload
        self.log: list[Exchange] = []
        self.warnings: list[str] = []
        self.broken_reason: str | None = None
        cfg = self._read_config()
        bs = cfg.block_size
        if bs <= 0 or bs & (bs - 1) or cfg.addr % bs or cfg.region_size % bs:
            raise ValueError(
                f"virtio-mem config unusable: block size {bs:#x}, addr {cfg.addr:#x}, "
                f"region size {cfg.region_size:#x}"
            )
        self.block_size = bs
        self.addr = cfg.addr
        self.region_size = cfg.region_size
        self.memory_block_size = memory_block_size
        sb_size = max(bs, pageblock_size)
        self.sbm = sb_size < memory_block_size and not force_bbm
        # A "unit" is what one bit tracks: a sub-block (SBM) or a big block (BBM). Groups of
        # units form the memory blocks that SBM orders its work by (in BBM a group is 1 unit).
        if self.sbm:
            self.unit_size = sb_size
            group = memory_block_size
        else:
            self.unit_size = max(bs, memory_block_size)
            group = self.unit_size
        self.units_per_group = group // self.unit_size
        self.group_size = group
        self.base = -(-cfg.addr // group) * group
        end = (cfg.addr + cfg.region_size) // group * group
        self.nb_groups = max(0, (end - self.base) // group)
        if self.nb_groups == 0:
            self.warnings.append("device region holds no whole memory block: nothing can be plugged")
        if cfg.addr % group or (cfg.addr + cfg.region_size) % group:
            self.warnings.append(
                f"device region [{cfg.addr:#x}, {cfg.addr + cfg.region_size:#x}) is not aligned to "
                f"{group:#x}: the unaligned parts are not used"
            )
        self._plugged_units = 0  # bitmap over units, bit i = unit i plugged
        self._plugged_size = 0
        self._cfg = cfg
        self._config_changed = False
        self._unplug_all_required = cfg.plugged_size != 0
        self._retry_at: float | None = None
        self._retry_interval = RETRY_TIMER_MIN

    # -- public API ---------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The config as last read."""
        return self._cfg

    @property
    def plugged_size(self) -> int:
        """What the driver believes is plugged."""
        return self._plugged_size

    @property
    def requested_size(self) -> int:
        return self._cfg.requested_size

    @property
    def retry_at(self) -> float | None:
        """Clock value at which the retry timer fires, or None."""
        return self._retry_at

    @property
    def state(self) -> DriverState:
        if self.broken_reason is not None:
            return DriverState.BROKEN
        if self._retry_at is not None:
            return DriverState.WAITING
        if self._config_changed or self._unplug_all_required or self._next_request() is not None:
            return DriverState.WORKING
        return DriverState.CONVERGED

    def config_changed(self) -> None:
        """The device raised a config-change interrupt: re-read the config on the next step
        and cancel a pending retry timer."""
        self._config_changed = True
        self._retry_at = None

    def request_unplug_all(self) -> None:
        """Model a driver reload with memory plugged: the next request is UNPLUG_ALL."""
        self._unplug_all_required = True
        self._retry_at = None

    def clone(self, device: Device, *, workload: Workload | None = None) -> GuestDriver:
        """This driver's state (plugged view, last config, pending work, retry timer, log)
        bound to ``device`` and ``workload``: the driver after a migration or a snapshot
        restore, where its state travels in guest memory. The original is unchanged."""
        twin = copy.copy(self)
        twin.device = device
        twin.queue = LocalVirtqueue(device.process_queue)
        twin.workload = workload
        twin.log = list(self.log)
        twin.warnings = list(self.warnings)
        return twin

    def assume_plugged(self, ranges: list[tuple[int, int]]) -> None:
        """The driver resumes on a device that already has ``ranges`` (gpa, size) plugged
        by this guest (after an incoming migration: its state travelled in guest memory).
        Whole units inside the ranges are taken as plugged; no UNPLUG_ALL is sent."""
        bits = 0
        for gpa, size in ranges:
            first = -(-(gpa - self.base) // self.unit_size)
            last = (gpa + size - self.base) // self.unit_size
            for unit in range(max(first, 0), last):
                bits |= 1 << unit
        self._plugged_units = bits
        self._plugged_size = bits.bit_count() * self.unit_size
        self._unplug_all_required = False
        self._cfg = self._read_config()

    def plugged_ranges(self) -> list[tuple[int, int]]:
        """(gpa, size) runs the driver has plugged, ascending."""
        out: list[tuple[int, int]] = []
        bits = self._plugged_units
        i = 0
        while bits >> i:
            if not (bits >> i) & 1:
                low = (bits >> i) & -(bits >> i)
                i += low.bit_length() - 1
                continue
            j = i
            while (bits >> j) & 1:
                j += 1
            out.append((self._unit_gpa(i), (j - i) * self.unit_size))
            i = j
        return out

    def step(self) -> Exchange | None:
        """Send at most one request and process its answer. Returns the exchange, or None
        when there is nothing to send now (converged, waiting for the timer, or broken)."""
        if self.broken_reason is not None:
            return None
        if self._retry_at is not None:
            if self.clock() < self._retry_at:
                return None
            self._retry_at = None
        if self._config_changed:
            self._config_changed = False
            self._refresh_config()
        if self._unplug_all_required:
            return self._send(ReqType.UNPLUG_ALL, 0, 0)
        nxt = self._next_request()
        if nxt is None:
            return None
        rtype, first_unit, count = nxt
        gpa = self._unit_gpa(first_unit)
        size = count * self.unit_size
        if rtype is ReqType.UNPLUG and self.workload is not None:
            self.workload.unplugging(gpa, size)
        return self._send(rtype, gpa, size // self.block_size, first_unit=first_unit, count=count)

    def run_until_converged(self, max_requests: int = 1_000_000) -> list[Exchange]:
        """Step until nothing is left to send now, at most ``max_requests`` requests.
        Returns the exchanges of this call. Does not wait for the retry timer."""
        out: list[Exchange] = []
        while len(out) < max_requests:
            ex = self.step()
            if ex is None:
                break
            out.append(ex)
        return out

    # -- internals ----------------------------------------------------------------------

    def _read_config(self) -> Config:
        return Config.unpack(bytes(self.device.config_bytes()))

    def _refresh_config(self) -> None:
        cfg = self._read_config()
        if cfg.plugged_size != self._plugged_size and not self._unplug_all_required:
            self.warnings.append(
                f"device plugged_size {cfg.plugged_size:#x} != driver's {self._plugged_size:#x}; "
                "adopting the device's value"
            )
            self._plugged_size = cfg.plugged_size
        self._cfg = cfg

    def _unit_gpa(self, unit: int) -> int:
        return self.base + unit * self.unit_size

    def _usable_groups(self) -> int:
        """Whole memory (big) blocks inside the usable region."""
        end = self.addr + min(self._cfg.usable_region_size, self.region_size)
        if end <= self.base:
            return 0
        return min(self.nb_groups, (end - self.base) // self.group_size)

    def _next_request(self) -> Next | None:
        """(type, first unit, unit count) of the next PLUG/UNPLUG (:mod:`.order`), or None."""
        diff = self._cfg.requested_size - self._plugged_size
        if diff > 0:
            return next_plug(
                self._plugged_units, self.units_per_group, self._usable_groups(), diff // self.unit_size
            )
        if diff < 0:
            return next_unplug(
                self._plugged_units, self.units_per_group, self.nb_groups, -diff // self.unit_size
            )
        return None

    def _send(
        self, rtype: ReqType, gpa: int, nb_blocks: int, *, first_unit: int = 0, count: int = 0
    ) -> Exchange:
        assert nb_blocks <= MAX_NB_BLOCKS
        now = self.clock()
        head = self.queue.add(encode_request(rtype, gpa, nb_blocks), RESPONSE_SIZE)
        try:
            self.queue.kick()
        except Exception as exc:  # the device failed as a transport would: no answer
            self.broken_reason = f"device raised {type(exc).__name__} on {rtype.name}: {exc}"
        used = self.queue.get_used()
        if self.broken_reason is not None or used is None or used.head != head:
            if self.broken_reason is None:
                self.broken_reason = f"device left {rtype.name} without an answer"
            ex = Exchange(rtype, gpa, nb_blocks, None, now)
            self.log.append(ex)
            return ex
        code = decode_response(used.data)
        ex = Exchange(rtype, gpa, nb_blocks, code, now)
        self.log.append(ex)
        self._handle_response(rtype, code, gpa, first_unit, count)
        return ex

    def _handle_response(
        self, rtype: ReqType, code: RespType | int, gpa: int, first: int, count: int
    ) -> None:
        size = count * self.unit_size
        if rtype is ReqType.UNPLUG_ALL:
            if code is RespType.ACK:
                self._plugged_units = 0
                self._plugged_size = 0
                self._unplug_all_required = False
                self._config_changed = True  # the usable region may have shrunk
                self._retry_interval = RETRY_TIMER_MIN
                if self.workload is not None:
                    self.workload.unplugged_all()
            else:
                self._arm_retry()
            return
        if code is RespType.ACK:
            mask = ((1 << count) - 1) << first
            if rtype is ReqType.PLUG:
                self._plugged_units |= mask
                self._plugged_size += size
                if self.workload is not None:
                    self.workload.plugged(gpa, size)
            else:
                self._plugged_units &= ~mask
                self._plugged_size -= size
            self._retry_interval = RETRY_TIMER_MIN
        elif code is RespType.NACK and rtype is ReqType.PLUG:
            self._config_changed = True
        elif code is RespType.ERROR:
            self.broken_reason = f"device answered ERROR to {rtype.name} addr={gpa:#x}"
        else:
            if rtype is ReqType.UNPLUG and self.workload is not None:
                self.workload.plugged(gpa, size)  # the guest uses the memory again
            self._arm_retry()

    def _arm_retry(self) -> None:
        self._retry_at = self.clock() + self._retry_interval
        self._retry_interval = min(self._retry_interval * 2, RETRY_TIMER_MAX)
