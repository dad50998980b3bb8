"""The migration stream's decoder (sans-I/O): :class:`Decoder`, a pull-based parser.

The format, its rules and the protocol between the decoder and its caller are those of
:mod:`ramdiscard.migration.stream` (module docstring).
"""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum
from itertools import pairwise

from ramdiscard.migration.checksum import Checksum, Hasher, available, digest
from ramdiscard.migration.stream import (
    _DEVICE,
    _END,
    _LIST_SUB,
    _PAGES_AT,
    _REGION,
    _ROUND,
    HANDOVER_SUB,
    LIST_PAGE,
    MAGIC,
    MAX_CHUNK,
    MAX_LIST_BYTES,
    MAX_META_PAYLOAD,
    MAX_NAME,
    MAX_REGION_PAYLOAD,
    MAX_REGIONS,
    PAGES_SUB,
    SECTION_HEADER,
    STREAM_HEADER,
    VERSION,
    Buffer,
    DeviceState,
    End,
    Event,
    Handover,
    Limits,
    PageData,
    PageList,
    RegionInfo,
    RegionKind,
    Round,
    SectionType,
    StreamError,
    StreamFlags,
    StreamHeader,
)


class _Phase(IntEnum):
    STREAM_HEADER = 0
    SECTION_HEADER = 1
    PAYLOAD = 2
    PAGE_DATA = 3
    DONE = 4


_ORDER = {
    SectionType.REGION: 0,
    SectionType.DEVICE: 1,
    SectionType.PAGES: 2,
    SectionType.PAGES_AT: 2,
    SectionType.END: 4,
    SectionType.ROUND: 2,
    SectionType.PAGE_LIST: 2,
    SectionType.POSTCOPY: 3,
}


class Decoder:
    """Pull-based parser of one stream (see the module docstring for the protocol).

    ``sparse_ok``: accept the SPARSE flag (and PAGES_AT sections); only a seekable
    snapshot file can honour it. ``postcopy_ok``: accept POSTCOPY sections in a live
    stream (each region's, in order, before END; runs ascending, disjoint, 4 KiB aligned,
    inside the region, at most :attr:`max_handover_runs` of them). ``limits``: the
    receiver's own caps (module rules), never above the format's. Every error raises
    :class:`StreamError` and leaves the decoder unusable.
    """

    def __init__(
        self,
        *,
        sparse_ok: bool = False,
        limits: Limits | None = None,
        live_ok: bool = False,
        postcopy_ok: bool = False,
    ) -> None:
        self._sparse_ok = sparse_ok
        self._live_ok = live_ok
        self._postcopy_ok = postcopy_ok
        self.max_handover_runs = MAX_META_PAYLOAD // 16
        """Most runs a POSTCOPY section may hold (a receiver lowers it to what it could
        receive: its plugged pages)."""
        self._handovers = 0
        self._sizes: list[int] = []
        self._limits = limits or Limits()
        self._phase = _Phase.STREAM_HEADER
        self._need = STREAM_HEADER.size
        self._flags = StreamFlags.NONE
        self._checksum = Checksum.CRC32
        self._type = SectionType.END
        self._crc = 0
        self._order = 0
        self._regions = 0
        self._devices = 0
        self._sections = 0
        self._page_sections = 0
        self._page_bytes = 0
        self._last_page: tuple[int, int] = (-1, 0)  # (region, end offset) of the previous page section
        self._pending: PageData | None = None
        self._pending_got = 0
        self._hasher: Hasher | None = None

    @property
    def done(self) -> bool:
        return self._phase is _Phase.DONE

    @property
    def flags(self) -> StreamFlags:
        return self._flags

    @property
    def checksum(self) -> Checksum:
        """Algorithm of page data checksums (from the stream header)."""
        return self._checksum

    def need(self) -> int:
        """Bytes :meth:`feed` wants next (0 while page data is pending or when done)."""
        if self._phase in (_Phase.PAGE_DATA, _Phase.DONE):
            return 0
        return self._need

    def _fail(self, msg: str) -> StreamError:
        self._phase = _Phase.DONE
        return StreamError(msg)

    def feed(self, data: Buffer) -> Event | None:
        """Consume exactly :meth:`need` bytes; returns the event they complete, or None
        when only a section header was read."""
        with memoryview(data) as view:
            if view.nbytes != self.need() or self.need() == 0:
                raise self._fail(f"decoder fed {view.nbytes} bytes, expected {self.need()}")
            raw = view.tobytes()
        if self._phase is _Phase.STREAM_HEADER:
            return self._stream_header(raw)
        if self._phase is _Phase.SECTION_HEADER:
            self._section_header(raw)
            return None
        return self._payload(raw)

    def _stream_header(self, raw: bytes) -> StreamHeader:
        magic, version, flags, algo, crc = STREAM_HEADER.unpack(raw)
        if magic != MAGIC:
            raise self._fail(f"not a ramdiscard migration stream (magic {magic!r})")
        if zlib.crc32(raw[:-4]) != crc:
            raise self._fail("stream header checksum mismatch")
        if version != VERSION:
            raise self._fail(f"unsupported migration stream version {version} (this is version {VERSION})")
        if flags & ~int(StreamFlags.SPARSE | StreamFlags.LIVE) or (
            flags & StreamFlags.LIVE and (not self._live_ok or flags & StreamFlags.SPARSE)
        ):
            raise self._fail(f"unknown stream flags {flags:#x}")
        try:
            self._checksum = Checksum(algo)
        except ValueError:
            raise self._fail(f"unknown page checksum algorithm {algo}") from None
        if self._checksum not in available():
            raise self._fail(f"page checksum {self._checksum.name} is not available on this host")
        self._flags = StreamFlags(flags)
        if self._flags & StreamFlags.SPARSE and not self._sparse_ok:
            raise self._fail("a sparse snapshot file can only be restored from a seekable file")
        self._phase = _Phase.SECTION_HEADER
        self._need = SECTION_HEADER.size
        return StreamHeader(version, self._flags, self._checksum)

    def _section_header(self, raw: bytes) -> None:
        stype, flags, length, crc, hcrc = SECTION_HEADER.unpack(raw)
        if zlib.crc32(raw[:-4]) != hcrc:
            raise self._fail(f"section header checksum mismatch (section #{self._sections + 1})")
        try:
            st = SectionType(stype)
        except ValueError:
            raise self._fail(f"unknown section type {stype}") from None
        if flags:
            raise self._fail(f"{st.name} section: unknown flags {flags:#x}")
        order = _ORDER[st]
        live = bool(self._flags & StreamFlags.LIVE)
        if live and st is SectionType.DEVICE:
            order = 2
        if (st in (SectionType.ROUND, SectionType.PAGE_LIST) and not live) or order < self._order:
            raise self._fail(f"{st.name} section out of order")
        if st is SectionType.POSTCOPY and not (live and self._postcopy_ok):
            raise self._fail("POSTCOPY section outside a postcopy migration")
        if st is SectionType.END and self._handovers and self._handovers != self._regions:
            raise self._fail(f"END after POSTCOPY sections for {self._handovers} of {self._regions} regions")
        sparse = bool(self._flags & StreamFlags.SPARSE)
        if (st is SectionType.PAGES and sparse) or (st is SectionType.PAGES_AT and not sparse):
            raise self._fail(f"{st.name} section in a {'sparse' if sparse else 'streamed'} stream")
        if st is SectionType.PAGES:
            if not PAGES_SUB.size < length <= PAGES_SUB.size + MAX_CHUNK:
                raise self._fail(f"PAGES section with payload length {length}")
            self._need = PAGES_SUB.size
        else:
            sizes = {SectionType.PAGES_AT: _PAGES_AT.size, SectionType.END: _END.size}
            sizes[SectionType.ROUND] = _ROUND.size
            fixed = sizes.get(st)
            if fixed is not None and length != fixed:
                raise self._fail(f"{st.name} section with payload length {length} (expected {fixed})")
            if st is SectionType.POSTCOPY and (
                (length - HANDOVER_SUB.size) % 16
                or not 0 <= length - HANDOVER_SUB.size <= 16 * self.max_handover_runs
            ):
                raise self._fail(f"POSTCOPY section with payload length {length}")
            if st is SectionType.PAGE_LIST and (
                (length - _LIST_SUB.size) % (8 + LIST_PAGE)
                or not 0 < length - _LIST_SUB.size <= MAX_LIST_BYTES
            ):
                raise self._fail(f"PAGE_LIST section with payload length {length}")
            if length > MAX_META_PAYLOAD or length < 4:
                raise self._fail(f"{st.name} section with payload length {length}")
            if st is SectionType.REGION:
                regions = min(self._limits.regions, MAX_REGIONS)
                if self._regions >= regions:
                    raise self._fail(
                        f"geometry mismatch: the stream announces more than {regions} RAM regions"
                    )
                if length > MAX_REGION_PAYLOAD:
                    raise self._fail(
                        f"REGION section with payload length {length} (limit {MAX_REGION_PAYLOAD})"
                    )
            elif st is SectionType.DEVICE and length > _DEVICE.size + self._limits.device_state:
                raise self._fail(
                    f"geometry mismatch: DEVICE section of {length} bytes, the largest device "
                    f"state here takes {_DEVICE.size + self._limits.device_state}"
                )
            self._need = length
        self._type, self._crc, self._order = st, crc, order
        self._section_len = length
        self._phase = _Phase.PAYLOAD

    def _payload(self, raw: bytes) -> Event:
        st = self._type
        if st is SectionType.PAGES:
            region, _r, offset = PAGES_SUB.unpack(raw)
            length = self._section_len - PAGES_SUB.size
            self._check_page(region, offset, length)
            self._pending = PageData(region, offset, length)
            self._pending_got = 0
            if self._hasher is None:
                self._hasher = Hasher(self._checksum)
            self._hasher.reset(zlib.crc32(raw))
            self._phase = _Phase.PAGE_DATA
            return self._pending
        if st is SectionType.PAGE_LIST:
            return self._page_list(raw)
        if zlib.crc32(raw) != self._crc:
            raise self._fail(f"{st.name} section checksum mismatch (section #{self._sections + 1})")
        event: Event
        if st is SectionType.REGION:
            event = self._region(raw)
        elif st is SectionType.DEVICE:
            (region,) = _DEVICE.unpack_from(raw)
            if self._regions == 0:
                raise self._fail("DEVICE section before any REGION section")
            live = bool(self._flags & StreamFlags.LIVE)
            if region >= self._regions or (region < self._devices and not live):
                raise self._fail(f"DEVICE section for region {region} out of order or unknown")
            self._devices = max(self._devices, region + 1)
            event = DeviceState(region, raw[_DEVICE.size :])
        elif st is SectionType.ROUND:
            number, _r, dirty = _ROUND.unpack(raw)
            event = Round(number, dirty)
        elif st is SectionType.POSTCOPY:
            event = self._handover(raw)
        elif st is SectionType.PAGES_AT:
            region, _r, offset, length, file_offset, data_crc = _PAGES_AT.unpack(raw)
            if not 0 < length <= MAX_CHUNK:
                raise self._fail(f"PAGES_AT section with length {length}")
            self._check_page(region, offset, length)
            self._count_page(length)
            event = PageData(region, offset, length, file_offset, data_crc)
        else:
            end = End(*_END.unpack(raw))
            if end != End(self._sections, self._page_sections, self._page_bytes):
                raise self._fail(
                    f"END section disagrees with the stream: it announces {end.sections} sections / "
                    f"{end.page_bytes} page bytes, the stream had {self._sections} / {self._page_bytes}"
                )
            self._phase = _Phase.DONE
            return end
        self._sections += 1
        self._phase = _Phase.SECTION_HEADER
        self._need = SECTION_HEADER.size
        return event

    def _page_list(self, raw: bytes) -> PageList:
        region, count = _LIST_SUB.unpack_from(raw)
        if count * (8 + LIST_PAGE) != len(raw) - _LIST_SUB.size:
            raise self._fail(f"PAGE_LIST section: {count} pages in a payload of {len(raw)} bytes")
        head = _LIST_SUB.size + 8 * count
        if digest(self._checksum, memoryview(raw)[head:], zlib.crc32(raw[:head])) != self._crc:
            raise self._fail(f"PAGE_LIST section checksum mismatch (region {region})")
        offsets = struct.unpack_from(f"<{count}Q", raw, _LIST_SUB.size)
        for a, b in pairwise(offsets):
            if b <= a:
                raise self._fail(f"PAGE_LIST section: offsets not ascending ({a:#x}, {b:#x})")
        if any(o % LIST_PAGE for o in offsets):
            raise self._fail("PAGE_LIST section: an offset is not 4 KiB aligned")
        self._check_page(region, offsets[0], LIST_PAGE)
        self._count_page(count * LIST_PAGE)
        self._sections += 1
        self._phase = _Phase.SECTION_HEADER
        self._need = SECTION_HEADER.size
        return PageList(region, offsets, raw[head:])

    def _handover(self, raw: bytes) -> Handover:
        region, _r, count = HANDOVER_SUB.unpack_from(raw)
        if region != self._handovers:
            raise self._fail(
                f"POSTCOPY section for region {region} out of order (expected {self._handovers})"
            )
        if count * 16 != len(raw) - HANDOVER_SUB.size:
            raise self._fail(f"POSTCOPY section: {count} runs in a payload of {len(raw)} bytes")
        flat = struct.unpack_from(f"<{2 * count}Q", raw, HANDOVER_SUB.size)
        runs = tuple(zip(flat[0::2], flat[1::2], strict=True))
        end = 0
        for s, n in runs:
            if (s | n) % LIST_PAGE or n == 0 or s < end or s + n > self._sizes[region]:
                raise self._fail(
                    f"POSTCOPY section of region {region}: run [{s:#x}, +{n:#x}) misaligned, empty, "
                    "out of order or outside the region"
                )
            end = s + n
        self._handovers += 1
        return Handover(region, runs)

    def _region(self, raw: bytes) -> RegionInfo:
        if len(raw) < _REGION.size:
            raise self._fail("REGION section too short")
        index, kind, size, gpa, page_size, name_len, id_len = _REGION.unpack_from(raw)
        if name_len > MAX_NAME or id_len > MAX_NAME:
            raise self._fail(f"REGION section {index}: name or device id longer than {MAX_NAME} bytes")
        if len(raw) != _REGION.size + name_len + id_len:
            raise self._fail("REGION section length does not match its name lengths")
        if index != self._regions:
            raise self._fail(f"REGION section {index} out of order (expected {self._regions})")
        try:
            rkind = RegionKind(kind)
            name = raw[_REGION.size : _REGION.size + name_len].decode()
            dev = raw[_REGION.size + name_len :].decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise self._fail(f"REGION section {index}: {exc}") from None
        if size == 0 or page_size == 0 or page_size & (page_size - 1) or size % page_size:
            raise self._fail(f"REGION section {index}: size {size:#x} / page size {page_size:#x}")
        self._regions += 1
        self._sizes.append(size)
        return RegionInfo(index, rkind, size, gpa, page_size, name, dev)

    def _check_page(self, region: int, offset: int, length: int) -> None:
        if region >= self._regions:
            raise self._fail(f"page section for unknown region {region}")
        last_region, last_end = self._last_page
        if self._flags & StreamFlags.LIVE:
            return
        if region < last_region or (region == last_region and offset < last_end):
            raise self._fail(f"page section [{region}:{offset:#x}] out of order or overlapping")
        self._last_page = (region, offset + length)

    def _count_page(self, length: int) -> None:
        self._page_sections += 1
        self._page_bytes += length

    def _page_piece(self, length: int) -> Hasher:
        pending = self._pending
        if self._phase is not _Phase.PAGE_DATA or pending is None or self._hasher is None:
            raise self._fail("page data without a pending PAGES section")
        if self._pending_got + length > pending.length:
            raise self._fail(
                f"{self._pending_got + length} bytes of page data for a section of {pending.length}"
            )
        self._pending_got += length
        return self._hasher

    def page_update(self, data: Buffer) -> None:
        """The next ``len(data)`` bytes of the pending PAGES data (only read, to be
        checksummed). Raises StreamError for more data than the section holds."""
        with memoryview(data) as view:
            self._page_piece(view.nbytes).update(view)

    def page_update_at(self, address: int, length: int) -> None:
        """:meth:`page_update` for ``length`` bytes at ``address``: the caller guarantees
        they are mapped and readable (a range of a buffer it holds; see
        :func:`ramdiscard.migration.checksum.address`). Saves building a buffer object
        per piece on the receive path."""
        self._page_piece(length).update_raw(address, length)

    def page_done(self, data: Buffer | None = None) -> None:
        """The pending PAGES data is complete: given here whole as ``data`` (guest
        memory, only checksummed), or already given piece by piece to
        :meth:`page_update`. Raises StreamError when bytes are missing or the checksum
        does not match."""
        if data is not None:
            self.page_update(data)
        pending = self._pending
        if self._phase is not _Phase.PAGE_DATA or pending is None or self._hasher is None:
            raise self._fail("page_done without pending page data")
        if self._pending_got != pending.length:
            raise self._fail(f"page_done after {self._pending_got} bytes, expected {pending.length}")
        if self._hasher.value() != self._crc:
            raise self._fail(
                f"PAGES section checksum mismatch (region {pending.region}, offset {pending.offset:#x})"
            )
        self._count_page(pending.length)
        self._sections += 1
        self._pending = None
        self._phase = _Phase.SECTION_HEADER
        self._need = SECTION_HEADER.size
