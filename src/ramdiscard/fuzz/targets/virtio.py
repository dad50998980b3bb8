"""virtio-mem request fuzzing: raw request bytes (target ``virtio-request``) and operation
sequences (``virtio-sequence``) against a real device over a real RAM block.

Input encoding (every byte string decodes to something; running out of bytes ends it):

* header: config byte (bit0 prealloc, bit1 double-discard partial listener), requested
  size in blocks, usable extent in blocks (0-3), a partial listener's first page and
  page count (2 bytes each), a 32-bit mask of blocks the refusing listener refuses.
* ``virtio-request`` body: records of ``len % 41`` then that many request bytes.
* ``virtio-sequence`` body: an opcode byte and its operands: a structured request, a raw
  request, requested-size writes (also invalid ones), device/system resets, listener
  registration/unregistration, a one-shot host fault armed for the next request, a
  migration round trip into a twin device, and the busy (migration running) flag.

Oracle: :class:`~ramdiscard.fuzz.model.DeviceModel` predicts each response byte for
byte, protocol errors and the broken state; after every operation the device must equal
the model and :func:`~ramdiscard.fuzz.invariants.check_device` must hold. ``deep_check``
verifies that no host memory is resident in unplugged blocks (``mincore``). The guest is
played too: every newly plugged block gets written, so residency is real.
"""

from __future__ import annotations

import errno
import importlib.util
import struct
from collections.abc import Hashable
from typing import Any

from ramdiscard import faults
from ramdiscard.errors import InvalidArgument
from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.invariants import PAGE, Refused, ViewListener, check_device, check_residency
from ramdiscard.fuzz.model import DeviceModel
from ramdiscard.interfaces import MappedMemory
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import DeviceBroken, ProtocolError, Request, RequestType, VirtioMem
from ramdiscard.providers.virtio_mem.persist import StateError
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

SIZE = 64 * MiB
BS = 2 * MiB
NB = SIZE // BS
ADDR = 4 * GiB
PAGES = SIZE // PAGE
_REQ = struct.Struct("<H6xQH6x")


class Reader:
    """Consumes an input; past the end every read returns 0 and ``done`` is set."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def done(self) -> bool:
        return self.pos >= len(self.data)

    def u8(self) -> int:
        if self.pos >= len(self.data):
            self.pos += 1
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() | self.u8() << 8

    def u32(self) -> int:
        return self.u16() | self.u16() << 16

    def take(self, n: int) -> bytes:
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out


class FakeRam:
    """Used only when ramdiscard.hostmem is missing: records nothing, passes checkpoints."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.page_size = PAGE
        self.host_address = 0x7F0000000000

    def discard_range(self, offset: int, length: int) -> None:
        faults.checkpoint(faults.Op.DISCARD)

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        faults.checkpoint(faults.Op.POPULATE)

    def close(self) -> None:
        pass


def new_ram(size: int) -> Any:
    if importlib.util.find_spec("ramdiscard.hostmem") is None:
        return FakeRam(size)
    from ramdiscard.hostmem import RamBlock

    # 4 KiB pages keep the guest's writes cheap; residency is checked per page anyway.
    return RamBlock(size, "anonymous", thp=False)


class VirtioHarness:
    """See the module docstring. ``sequence`` selects the operation-sequence encoding."""

    def __init__(self, *, sequence: bool) -> None:
        self.sequence = sequence
        self.ram = new_ram(SIZE)
        self.twin_ram = new_ram(SIZE) if sequence else None
        self.policy = DiscardPolicy()
        self.dev: VirtioMem | None = None
        self.listeners: list[ViewListener] = []
        self.model: DeviceModel | None = None
        self.busy = False
        self.residency_unknown = False
        self.prealloc = False
        self.stats: dict[str, int] = {}

    # -- lifetime -----------------------------------------------------------------------

    def _teardown(self) -> None:
        dev, self.dev = self.dev, None
        if dev is None:
            return
        for lst in dev.listeners:
            dev.unregister_listener(lst)
        dev.unrealize()

    def close(self) -> None:
        try:
            self._teardown()
        finally:
            for ram in (self.ram, self.twin_ram):
                if ram is not None:
                    ram.close()

    def deep_check(self) -> None:
        if self.dev is not None and not self.residency_unknown:
            check_residency(self.dev)

    # -- checks ---------------------------------------------------------------------------

    def _check(self) -> None:
        dev, model = self.dev, self.model
        assert dev is not None and model is not None
        check_device(dev, self.listeners)
        assert dev.plugged_size == model.plugged_size, (dev.plugged_size, model.plugged_size)
        assert dev.requested_size == model.requested
        assert dev.usable_region_size == model.usable, (hex(dev.usable_region_size), hex(model.usable))
        assert dev.broken == model.broken
        plugged = {s // BS + i for s, size in dev.plugged_ranges() for i in range(size // BS)}
        assert plugged == model.plugged, f"device {sorted(plugged)} != model {sorted(model.plugged)}"

    def _refused(self, offset: int, size: int) -> bool:
        return any(lst.refuses(offset, size) for lst in self.dev.listeners if isinstance(lst, ViewListener))  # type: ignore[union-attr]

    def _touch_new(self, before: set[int]) -> None:
        if not isinstance(self.ram, MappedMemory) or self.model is None:
            return
        view = self.ram.view
        for block in self.model.plugged - before:
            view[block * BS] = 0xA5

    # -- operations -------------------------------------------------------------------------

    def _request(self, raw: bytes, fault: str | None = None) -> str:
        dev, model = self.dev, self.model
        assert dev is not None and model is not None
        if model.broken:
            try:
                dev.handle_request(raw)
            except DeviceBroken:
                pass
            else:
                raise AssertionError("a broken device answered a request")
            return "broken"
        if len(raw) < 24 or struct.unpack_from("<H", raw)[0] > 3:
            try:
                dev.handle_request(raw)
            except DeviceBroken as exc:
                raise AssertionError("DeviceBroken from a working device") from exc
            except ProtocolError:
                model.broken = True
                return "protocol"
            raise AssertionError(f"no ProtocolError for a {len(raw)}-byte request")
        rtype, addr, nb = _REQ.unpack_from(raw)
        req = (
            Request(RequestType(rtype))
            if rtype == RequestType.UNPLUG_ALL
            else Request(RequestType(rtype), addr, nb)
        )
        before = set(model.plugged)
        expected = model.expect(
            req,
            refused=self._refused,
            busy=self.busy,
            populate_fails=self.prealloc and fault in ("populate", "any"),
            discard_fails=fault in ("discard", "any"),
        )
        if fault is None:
            got = dev.handle_request(raw)
        else:
            op = None if fault == "any" else fault
            with faults.inject(op, nth=1, errno=errno.EIO) as plan:
                got = dev.handle_request(raw)
            if plan.fired and fault == "discard" and req.type is RequestType.PLUG:
                # The fault hit the best-effort re-discard of a refused plug: that memory
                # may stay resident (documented in docs/reliability.md).
                self.residency_unknown = True
        want = expected.pack()
        assert got == want, f"{req} -> {got.hex()} expected {want.hex()} (fault={fault}, busy={self.busy})"
        self._touch_new(before)
        return f"{req.type.name}:{expected.type.name}"

    def _register(self, r: Reader) -> str:
        dev = self.dev
        assert dev is not None
        start = r.u16() % PAGES
        pages = 1 + r.u16() % (PAGES - start)
        flags = r.u8()
        mask = r.u8() if flags & 2 else 0
        refuse = frozenset(b for b in range(NB) if mask >> (b % 8) & 1)
        lst = ViewListener(
            double_discard=bool(flags & 1),
            block_size=BS,
            refuse_blocks=refuse,
            name=f"L{len(self.listeners)}",
        )
        section = MemoryRegionSection(dev.region, start * PAGE, pages * PAGE, ADDR + start * PAGE)
        will_refuse = any(lst.refuses(s, e - s, section) for s, e in dev.populated_runs())
        try:
            dev.register_listener(lst, section)
        except Refused:
            assert will_refuse, "registration refused without a refusing replay"
            assert lst.section is None and not lst.view.any(), "refused registration left state"
            return "register:refused"
        assert not will_refuse, "a refusing replay did not fail the registration"
        self.listeners.append(lst)
        return "register"

    def _unregister(self, r: Reader) -> str:
        live = [lst for lst in self.listeners if lst.section is not None]
        if not live:
            return "unregister:none"
        lst = live[r.u8() % len(live)]
        assert self.dev is not None
        self.dev.unregister_listener(lst)
        assert not lst.view.any(), f"{lst!r} still holds memory after unregistration"
        return "unregister"

    def _set_requested(self, r: Reader) -> str:
        dev, model = self.dev, self.model
        assert dev is not None and model is not None
        value = r.u8() * (BS // 2)
        if value % BS or value > SIZE:
            try:
                dev.requested_size = value
            except InvalidArgument:
                return "requested:invalid"
            raise AssertionError(f"requested_size {value:#x} accepted")
        dev.requested_size = value
        model.set_requested(value)
        return "requested"

    def _migrate(self) -> str:
        dev, model = self.dev, self.model
        assert dev is not None and model is not None and self.twin_ram is not None
        image = dev.save_state()
        mr = MemoryRegion.new_ram("fuzz-twin", self.twin_ram)
        twin = VirtioMem(
            mr,
            addr=ADDR,
            block_size=BS,
            requested_size=0,
            policy=self.policy,
            usable_extent=dev.usable_extent,
        )
        lst = ViewListener(block_size=BS, name="twin")
        try:
            twin.register_listener(lst, MemoryRegionSection(mr, 0, SIZE, ADDR))
            twin.load_state(image)
            check_device(twin, [lst])
            assert twin.bitmap_bytes() == dev.bitmap_bytes()
            assert (twin.plugged_size, twin.requested_size, twin.usable_region_size) == (
                dev.plugged_size,
                dev.requested_size,
                dev.usable_region_size,
            )
            try:
                twin.load_state(image)
            except StateError:
                pass
            else:
                assert not twin.plugged_size, "load into a device with memory plugged was accepted"
        finally:
            for x in twin.listeners:
                twin.unregister_listener(x)
            twin.unrealize()
        return "migrate"

    def _system_reset(self, wakeup: bool, fault: str | None) -> str:
        dev, model = self.dev, self.model
        assert dev is not None and model is not None
        if wakeup:
            dev.system_reset(wakeup=True)
            return "wakeup"
        if fault is None:
            dev.system_reset()
        else:
            with faults.inject("discard", nth=1, errno=errno.EIO):
                dev.system_reset()
        model.system_reset(busy=self.busy, discard_fails=fault is not None)
        return "system_reset"

    # -- one input ---------------------------------------------------------------------------

    def run(self, data: bytes) -> Hashable:
        self._teardown()
        self.listeners = []
        self.busy = False
        self.residency_unknown = False
        r = Reader(data)
        cfg = r.u8()
        requested = (r.u8() % (NB + 1)) * BS
        extent = (r.u8() % 4) * BS
        self.prealloc = bool(cfg & 1) and self.sequence
        mr = MemoryRegion.new_ram("fuzz-vmem", self.ram)
        self.dev = dev = VirtioMem(
            mr,
            addr=ADDR,
            block_size=BS,
            requested_size=requested,
            policy=self.policy,
            usable_extent=extent,
            prealloc=self.prealloc,
            busy=lambda: self.busy,
        )
        self.model = DeviceModel(ADDR, SIZE, BS, extent, requested)
        start = r.u16() % PAGES
        pages = 1 + r.u16() % (PAGES - start)
        mask = r.u32()
        specs = [
            ("full", 0, PAGES, False, frozenset[int]()),
            ("part", start, pages, bool(cfg & 2), frozenset[int]()),
            ("refuse", 0, PAGES, False, frozenset(b for b in range(NB) if mask >> b & 1)),
        ]
        for name, first, count, dd, refuse in specs:
            lst = ViewListener(double_discard=dd, block_size=BS, refuse_blocks=refuse, name=name)
            dev.register_listener(
                lst, MemoryRegionSection(mr, first * PAGE, count * PAGE, ADDR + first * PAGE)
            )
            self.listeners.append(lst)
        self._check()
        trail: list[str] = []
        fault: str | None = None
        while not r.done and len(trail) < 256:
            if not self.sequence:
                trail.append(self._request(r.take(r.u8() % 41)))
                self._check()
                continue
            op = r.u8() % 12
            if op <= 2:
                rtype = r.u8()
                block = r.u8() % (NB + 4) - 2
                nb = r.u8() % 10
                gpa = max(0, ADDR + block * BS + (r.u8() * PAGE if rtype & 0x80 else 0))
                out = self._request(_REQ.pack(rtype % 4, gpa, nb), fault)
                fault = None
            elif op == 3:
                out = self._request(r.take(r.u8() % 41), fault)
                fault = None
            elif op == 4:
                out = self._set_requested(r)
            elif op == 5:
                dev.device_reset()
                self.model.broken = False
                out = "device_reset"
            elif op == 6:
                out = self._system_reset(bool(r.u8() & 1), fault)
                fault = None
            elif op == 7:
                out = self._register(r)
            elif op == 8:
                out = self._unregister(r)
            elif op == 9:
                fault = ("discard", "populate", "any")[r.u8() % 3]
                out = f"arm:{fault}"
            elif op == 10:
                out = self._migrate()
            else:
                self.busy = not self.busy
                out = "busy"
            trail.append(out)
            self._check()
        return tuple(sorted(set(trail))), len(trail) // 8


def _request_seeds() -> list[bytes]:
    def req(t: int, block: int, nb: int) -> bytes:
        return bytes([24]) + _REQ.pack(t, ADDR + block * BS, nb)

    head = bytes([0, 16, 1]) + struct.pack("<HHI", 100, 3000, 0x00F0)
    plug = req(0, 0, 4) + req(0, 4, 4) + req(3, 0, 8) + req(1, 2, 2) + req(3, 0, 8) + req(2, 0, 0)
    return [
        head + plug,
        head + req(0, 6, 4) + req(0, 30, 4) + req(0, 0, 17) + bytes([10]) + b"\x09" * 10 + req(2, 0, 0),
        bytes([2, 32, 0]) + struct.pack("<HHI", 0, PAGES, 0) + req(0, 0, 32) + req(1, 0, 32),
    ]


def _sequence_seeds() -> list[bytes]:
    def req(t: int, block: int, nb: int) -> bytes:
        return bytes([0, t, (block + 2) % 256, nb])

    head = bytes([1, 8, 1]) + struct.pack("<HHI", 512, 4096, 0x3000)
    return [
        head + req(0, 0, 4) + bytes([4, 32]) + req(0, 4, 8) + bytes([10]) + req(1, 0, 2) + bytes([6, 0]),
        head + bytes([7, 0, 0, 0, 16, 3, 0xFF]) + req(0, 0, 2) + bytes([9, 0]) + req(1, 0, 1) + bytes([8, 0]),
        head + bytes([11]) + req(0, 0, 1) + bytes([11, 9, 1]) + req(0, 0, 1) + bytes([9, 2, 6, 0, 5, 10]),
    ]


REQUEST_TARGET = Target(
    "virtio-request",
    "raw virtio-mem request bytes against a device with three listeners over a real RAM block",
    _request_seeds,
    lambda: VirtioHarness(sequence=False),
)
SEQUENCE_TARGET = Target(
    "virtio-sequence",
    "request sequences with requested-size changes, resets, listener churn, host faults, busy, migration",
    _sequence_seeds,
    lambda: VirtioHarness(sequence=True),
)
