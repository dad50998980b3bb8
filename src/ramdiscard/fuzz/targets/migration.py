"""Migration-stream fuzzing: target ``migration`` (:func:`ramdiscard.migration.load`).

The destination machine is real: a virtio-mem device over a 64 MiB RAM block with a
RamDiscardListener and a vfio container (null backend) attached, plus an unmanaged
RAM region of 64 KiB, all in one address space. Seeds are streams saved from a source machine of
the same geometry with some blocks plugged and written (CRC-32 page checksums). The
mutator re-seals the stream header CRC, every section header CRC and payload checksum
on most mutants, so the decoder's structural checks and the destination's semantic
checks (region table, device state, page placement, END accounting) are reached.

Documented outcomes of ``load``: :class:`MigrationStats`, after which device, listener
and container are consistent and no host memory is resident outside plugged blocks; or
:class:`MigrationError` (``StreamError`` included), after which the destination is *all
discarded*: nothing plugged, the original requested size, listener and container empty,
no memory resident in either region.
"""

from __future__ import annotations

import importlib.util
import io
import random
import struct
import zlib
from collections.abc import Hashable, Sequence
from typing import Any

from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.invariants import ViewListener, check_container, check_device, check_residency
from ramdiscard.fuzz.mutate import mutate_bytes
from ramdiscard.fuzz.targets.virtio import ADDR, BS, SIZE, new_ram
from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB

BOOT = 64 * 1024
_SECTION = struct.Struct("<IIQQI")
_DEVICE = 2  # SectionType.DEVICE
_PAGES = 3  # SectionType.PAGES


def _unavailable() -> str | None:
    if importlib.util.find_spec("ramdiscard.migration") is None:
        return "ramdiscard.migration is not on this branch"
    return None


class _Machine:
    """Boot RAM at 0, a virtio-mem device at ADDR, listener, vfio container."""

    def __init__(self, policy: DiscardPolicy) -> None:
        from ramdiscard.consumers.dma import NullDmaBackend
        from ramdiscard.consumers.vfio import VfioContainer

        self.boot_ram = new_ram(BOOT)
        self.ram = new_ram(SIZE)
        self.boot = MemoryRegion.new_ram("boot", self.boot_ram)
        self.mr = MemoryRegion.new_ram("vmem0-mem", self.ram)
        self.dev = VirtioMem(self.mr, addr=ADDR, block_size=BS, requested_size=0, policy=policy)
        self.root = MemoryRegion.new_container("fuzz-mig-root", ADDR + SIZE)
        self.root.add_subregion(0, self.boot)
        self.root.add_subregion(ADDR, self.dev.device_region)
        self.space = AddressSpace("fuzz-mig", self.root)
        self.listener = ViewListener(block_size=BS, name="mig")
        self.dev.register_listener(self.listener, MemoryRegionSection(self.mr, 0, SIZE, ADDR))
        self.container: Any = None
        if importlib.util.find_spec("ramdiscard.consumers.vfio") is not None:
            self.container = VfioContainer(NullDmaBackend(), policy=policy)
            self.container.attach(self.space)

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container.backend.close()
        for sub in self.root.subregions:
            self.root.del_subregion(sub)
        self.space.destroy()
        for lst in self.dev.listeners:
            self.dev.unregister_listener(lst)
        self.dev.unrealize()
        self.ram.close()
        self.boot_ram.close()


class _Sink:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def send(self, header: bytes, data: memoryview | None = None) -> None:
        self.buf.write(header)
        if data is not None:
            self.buf.write(data)


def _source_streams() -> list[bytes]:
    from ramdiscard.migration.checksum import Checksum
    from ramdiscard.migration.source import save_to_sink

    out: list[bytes] = []
    policy = DiscardPolicy()
    for plugged, requested in (([(5, 1)], 8), ([], 0), ([(0, 1), (31, 1)], 32)):
        src = _Machine(policy)
        try:
            src.dev.requested_size = requested * BS
            for first, nb in plugged:
                assert src.dev.plug(ADDR + first * BS, nb) is ResponseType.ACK
                src.ram.view[first * BS : first * BS + 5] = b"guest"
            src.boot_ram.view[0:4] = b"boot"
            sink = _Sink()
            save_to_sink(src.space, [src.dev], sink, 1 * MiB, checksum=Checksum.CRC32)
            out.append(sink.buf.getvalue())
        finally:
            src.close()
    return out


def reseal(data: bytes) -> bytes:
    """Recompute every CRC the decoder checks (stream header, section headers, metadata,
    the device state image's own CRC and CRC-32 page checksums), following the length
    fields as they are."""
    buf = bytearray(data)
    if len(buf) < 20:
        return bytes(buf)
    struct.pack_into("<I", buf, 16, zlib.crc32(buf[:16]))
    pos = 20
    while pos + _SECTION.size <= len(buf):
        stype, _flags, length, _crc, _h = _SECTION.unpack_from(buf, pos)
        start = pos + _SECTION.size
        end = min(len(buf), start + length)
        if stype == _DEVICE and end - start > 8:
            # The virtio-mem state image inside carries its own CRC-32 (last 4 bytes).
            struct.pack_into("<I", buf, end - 4, zlib.crc32(buf[start + 4 : end - 4]))
        payload = bytes(buf[start:end])
        crc = zlib.crc32(payload[16:], zlib.crc32(payload[:16])) if stype == _PAGES else zlib.crc32(payload)
        struct.pack_into("<Q", buf, pos + 16, crc)
        struct.pack_into("<I", buf, pos + 24, zlib.crc32(buf[pos : pos + 24]))
        if length > len(buf):
            break
        pos = start + length
    return bytes(buf)


def _headers(data: bytes) -> list[int]:
    """Offsets of the section headers, following the length fields."""
    out: list[int] = []
    pos = 20
    while pos + _SECTION.size <= len(data) and len(out) < 4096:
        out.append(pos)
        length = _SECTION.unpack_from(data, pos)[2]
        if length > len(data):
            break
        pos += _SECTION.size + length
    return out


def _mutate(data: bytes, rng: random.Random, corpus: Sequence[bytes], max_size: int) -> bytes:
    # Page data is megabytes of a stream but holds no structure: aim most mutations at
    # the metadata (everything before the first page section) or at one section header.
    heads = _headers(data)
    choice = rng.random()
    if heads and choice < 0.8:
        if choice < 0.5:
            first_page = next((h for h in heads if _SECTION.unpack_from(data, h)[0] == _PAGES), len(data))
            lo, hi = 0, first_page
        else:
            lo = rng.choice(heads)
            hi = min(len(data), lo + _SECTION.size + 16)
        piece = mutate_bytes(data[lo:hi], rng, (), max(64, hi - lo + 64))
        out = data[:lo] + piece + data[hi:]
    else:
        out = mutate_bytes(data, rng, corpus, max_size)
    out = out[:max_size]
    return reseal(out) if rng.random() < 0.85 else out


class MigrationHarness:
    def __init__(self) -> None:
        self.policy = DiscardPolicy()
        self.m = _Machine(self.policy)

    def close(self) -> None:
        self.m.close()

    def deep_check(self) -> None:
        check_residency(self.m.dev)

    def _check_consistent(self) -> None:
        m = self.m
        check_device(m.dev, [m.listener])
        if m.container is not None:
            check_container(m.container, m.dev)

    def run(self, data: bytes) -> Hashable:
        from ramdiscard.migration import MigrationError, load

        m = self.m
        # Back to an empty destination (a success leaves memory plugged).
        if m.dev.plugged_size:
            assert m.dev.unplug_all() is ResponseType.ACK
        m.dev.requested_size = 0
        m.boot_ram.discard_range(0, BOOT)
        try:
            stats = load(m.space, [m.dev], io.BytesIO(data))
        except MigrationError as exc:
            self._check_consistent()
            assert m.dev.plugged_size == 0, "a failed load left memory plugged"
            assert m.dev.requested_size == 0, "a failed load changed the requested size"
            assert m.ram.resident_bytes() == 0, "a failed load left device memory resident"
            assert m.boot_ram.resident_bytes() == 0, "a failed load left boot memory resident"
            return ("error", type(exc).__name__, str(exc)[:28])
        self._check_consistent()
        check_residency(m.dev)
        return ("ok", stats.page_sections > 0, m.dev.plugged_size // BS)


MIGRATION_TARGET = Target(
    "migration",
    "migration streams loaded into a real destination (device, listener, vfio container, boot RAM)",
    _source_streams,
    MigrationHarness,
    mutate=_mutate,
    max_size=1 << 23,
    unavailable=_unavailable,
)
