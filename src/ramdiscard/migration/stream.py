"""The ramdiscard migration stream: format, encoder and decoder (sans-I/O).

Rules (the format is described for users in ``docs/migration-format.md``):

* A stream is a 20-byte stream header (magic ``RDMIGRAT``, version, flags, page
  checksum algorithm, CRC-32), then sections, each a 28-byte section header (type, flags,
  payload length, payload checksum, header CRC-32) followed by its payload. Metadata
  payloads are checked with CRC-32, page data with the stream's algorithm (CRC-32 or
  XXH3-64, :mod:`ramdiscard.migration.checksum`). Everything is little-endian. The header
  CRC covers the type and the length, so a corrupt length is caught before anything is
  read or allocated for it.
* Sections come in a fixed order: REGION (one per RAM region, indexes 0, 1, ...), DEVICE
  (one per managed region, in region order, sent "early", before any RAM), page sections
  (PAGES with the data inline, or PAGES_AT pointing at data elsewhere in a sparse
  snapshot file), END. Page sections of one region come in ascending, non-overlapping
  order and regions in index order. Nothing may follow END.
* END carries the number of sections and page bytes before it; a decoder checks both.
* Live streams (flag LIVE, precopy; accepted only by a decoder created with
  ``live_ok``): after the REGION table, DEVICE, PAGES and ROUND sections may come in any
  order and any number of times. A later DEVICE state for a region replaces the earlier
  one; PAGES may repeat (a later copy of a page replaces the earlier one); ROUND marks
  the end of a precopy round (its number, and the bytes the source then knew dirty).
  Stop-and-copy streams are valid live-stream input too.
* Limits: a metadata payload is at most :data:`MAX_META_PAYLOAD` bytes, page data per
  section at most :data:`MAX_CHUNK`, a REGION payload at most :data:`MAX_REGION_PAYLOAD`
  (names and device ids at most :data:`MAX_NAME` bytes), at most :data:`MAX_REGIONS`
  regions. A receiver passes its own, lower limits (:class:`Limits`: its region count and
  the size of its largest device state image); every count and length is checked against
  them as soon as its header is read, before anything is allocated for it. Anything else
  (bad magic, version, flags, type, order, length, checksum) raises :class:`StreamError`
  before any of its payload is used. Error messages quote at most :data:`QUOTE_LIMIT`
  characters of a value taken from the stream.

Theory of operation: the encoder only builds headers; page data is never copied into
the stream. :func:`page_header` checksums a memoryview of guest memory and returns the
40 bytes that precede it, so a transport can send ``[header, view]`` with one
``sendmsg``. The decoder is pull-based: :meth:`Decoder.need` says how many bytes the next
fixed-size piece has, :meth:`Decoder.feed` takes exactly those bytes and returns an event.
For a PAGES section the event is a :class:`PageData` telling the caller where the data
goes; the caller reads the data straight into guest memory and hands each piece, right
after it landed (still in the CPU cache), to :meth:`Decoder.page_update`, then calls
:meth:`Decoder.page_done`, which compares the checksum (or hands the whole data to
``page_done`` at once).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from itertools import pairwise

from ramdiscard.errors import ProtocolViolation, RamDiscardError
from ramdiscard.migration.checksum import Checksum, Hasher, available, digest
from ramdiscard.units import MiB

Buffer = bytes | bytearray | memoryview
"""What the encoder and decoder accept as data (only read, never kept)."""

MAGIC = b"RDMIGRAT"
VERSION = 1
MAX_CHUNK = 64 * MiB
"""Largest page payload of one section (the encoder's default chunk is 4 MiB)."""
MAX_META_PAYLOAD = 256 * MiB
"""Largest payload of a non-page section (a 16 TiB region with 1 MiB blocks needs 2 MiB)."""
MAX_NAME = 1024
"""Longest region name or device id, in UTF-8 bytes."""
MAX_REGIONS = 4096
"""Most RAM regions a stream may announce (a decoder may be given a lower, local limit)."""

STREAM_HEADER = struct.Struct("<8sHHII")  # magic, version, flags, page checksum algorithm, crc
SECTION_HEADER = struct.Struct("<IIQQI")  # type, flags, payload length, payload checksum, header crc
_REGION = struct.Struct("<IIQQQHH")  # index, kind, size, gpa, page size, name len, id len
_DEVICE = struct.Struct("<I")  # region index; the device's state image follows
MAX_REGION_PAYLOAD = _REGION.size + 2 * MAX_NAME
"""Largest REGION payload: the fixed part and two names at their limit."""
PAGES_SUB = struct.Struct("<IIQ")  # region index, reserved, region offset; data follows
_PAGES_AT = struct.Struct("<IIQQQQ")  # region, reserved, offset, length, file offset, data checksum
_END = struct.Struct("<QQQ")  # sections before END, page sections, page bytes
_ROUND = struct.Struct("<IIQ")  # round number, reserved, dirty bytes


class MigrationError(RamDiscardError):
    """A migration, snapshot or restore failed; the message says why and what was left."""


class StreamError(MigrationError, ProtocolViolation):
    """The stream is truncated, corrupt, out of order or of another format/version."""


class StreamFlags(IntFlag):
    NONE = 0
    SPARSE = 1
    """Snapshot file: page sections are PAGES_AT, data at file offsets (holes elsewhere)."""
    LIVE = 2
    """Precopy stream: DEVICE, PAGES and ROUND interleave (module rules)."""


class SectionType(IntEnum):
    REGION = 1
    DEVICE = 2
    PAGES = 3
    PAGES_AT = 4
    END = 5
    ROUND = 6
    PAGE_LIST = 7


class RegionKind(IntEnum):
    WHOLE = 0
    """No manager: the whole region is sent."""
    MANAGED = 1
    """A RamDiscardManager (virtio-mem device) decides which runs are sent."""


@dataclass(frozen=True, slots=True)
class StreamHeader:
    version: int
    flags: StreamFlags
    checksum: Checksum


@dataclass(frozen=True, slots=True)
class RegionInfo:
    """One RAM region of the source: identity and geometry (destination must match)."""

    index: int
    kind: RegionKind
    size: int
    gpa: int
    page_size: int
    name: str
    device_id: str


@dataclass(frozen=True, slots=True)
class DeviceState:
    region: int
    state: bytes


@dataclass(frozen=True, slots=True)
class PageData:
    """``length`` bytes for region ``region`` at region offset ``offset``. Inline
    (``file_offset`` None): the caller reads them next and calls :meth:`Decoder.page_done`.
    Otherwise they are at ``file_offset`` of the snapshot file, with CRC ``data_crc``."""

    region: int
    offset: int
    length: int
    file_offset: int | None = None
    data_checksum: int = 0


@dataclass(frozen=True, slots=True)
class Round:
    """End of precopy round ``number``; the source then knew ``dirty`` bytes dirty."""

    number: int
    dirty: int


@dataclass(frozen=True, slots=True)
class End:
    sections: int
    page_sections: int
    page_bytes: int


@dataclass(frozen=True, slots=True)
class PageList:
    """Scattered 4 KiB pages of region ``region`` (live streams): ``offsets`` ascending,
    ``data`` their contents in that order, checksum already verified."""

    region: int
    offsets: tuple[int, ...]
    data: bytes


Event = StreamHeader | RegionInfo | DeviceState | PageData | Round | End | PageList

QUOTE_LIMIT = 64


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters (for error messages that quote
    untrusted values: an error stays one short line)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts: at most ``regions`` REGION sections, DEVICE payloads of at
    most ``device_state`` bytes (state image, without the region index)."""

    regions: int = MAX_REGIONS
    device_state: int = MAX_META_PAYLOAD - 4


# -- encoding -------------------------------------------------------------------------------


def encode_stream_header(flags: StreamFlags = StreamFlags.NONE, checksum: Checksum = Checksum.CRC32) -> bytes:
    body = STREAM_HEADER.pack(MAGIC, VERSION, int(flags), int(checksum), 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body))


def _section_header(stype: SectionType, length: int, crc: int) -> bytes:
    body = struct.pack("<IIQQ", int(stype), 0, length, crc)
    return body + struct.pack("<I", zlib.crc32(body))


def section(stype: SectionType, payload: bytes) -> bytes:
    """A complete metadata section (header + payload)."""
    if len(payload) > MAX_META_PAYLOAD:
        raise MigrationError(f"{stype.name} payload of {len(payload)} bytes exceeds the format limit")
    return _section_header(stype, len(payload), zlib.crc32(payload)) + payload


def encode_region(info: RegionInfo) -> bytes:
    name = info.name.encode()
    dev = info.device_id.encode()
    if len(name) > MAX_NAME or len(dev) > MAX_NAME:
        raise MigrationError(
            f"region name or device id too long: {quote(info.name)} / {quote(info.device_id)}"
        )
    payload = (
        _REGION.pack(info.index, int(info.kind), info.size, info.gpa, info.page_size, len(name), len(dev))
        + name
        + dev
    )
    return section(SectionType.REGION, payload)


def encode_device(region: int, state: bytes) -> bytes:
    return section(SectionType.DEVICE, _DEVICE.pack(region) + state)


def page_header(region: int, offset: int, data: Buffer, checksum: Checksum = Checksum.CRC32) -> bytes:
    """The 44 bytes (section header + sub-header) that precede ``data`` in a PAGES
    section; the checksum is ``checksum`` of the data seeded with the sub-header's CRC-32.
    ``data`` is only read (checksummed), never copied."""
    with memoryview(data) as view:
        length = view.nbytes
        if not 0 < length <= MAX_CHUNK:
            raise MigrationError(f"page chunk of {length} bytes (limit {MAX_CHUNK})")
        sub = PAGES_SUB.pack(region, 0, offset)
        crc = digest(checksum, view, zlib.crc32(sub))
    return _section_header(SectionType.PAGES, PAGES_SUB.size + length, crc) + sub


PAGES_AT_SECTION_SIZE = SECTION_HEADER.size + _PAGES_AT.size
_LIST_SUB = struct.Struct("<II")
LIST_PAGE = 4096
MAX_LIST_PAGES = 256
"""Most pages in one PAGE_LIST section."""
MAX_LIST_BYTES = MAX_LIST_PAGES * (8 + LIST_PAGE)


def page_list_header(region: int, offsets: list[int], data: Buffer, checksum: Checksum) -> bytes:
    """Section header, sub-header and offsets that precede ``data`` (the pages at
    ``offsets``, in order) in a PAGE_LIST section; the checksum is ``checksum`` of the
    data seeded with the CRC-32 of what precedes it in the payload."""
    n = len(offsets)
    if not 0 < n <= MAX_LIST_PAGES:
        raise MigrationError(f"PAGE_LIST of {n} pages (limit {MAX_LIST_PAGES})")
    head = _LIST_SUB.pack(region, n) + struct.pack(f"<{n}Q", *offsets)
    crc = digest(checksum, data, zlib.crc32(head))
    return _section_header(SectionType.PAGE_LIST, len(head) + n * LIST_PAGE, crc) + head


def encode_pages_at(region: int, offset: int, length: int, file_offset: int, data_crc: int) -> bytes:
    return section(SectionType.PAGES_AT, _PAGES_AT.pack(region, 0, offset, length, file_offset, data_crc))


END_SECTION_SIZE = SECTION_HEADER.size + _END.size


def encode_round(number: int, dirty: int) -> bytes:
    return section(SectionType.ROUND, _ROUND.pack(number, 0, dirty))


def encode_end(end: End) -> bytes:
    return section(SectionType.END, _END.pack(end.sections, end.page_sections, end.page_bytes))


class Counter:
    """Counts what an encoder emitted, to build the END section."""

    def __init__(self) -> None:
        self.sections = 0
        self.page_sections = 0
        self.page_bytes = 0

    def meta(self) -> None:
        self.sections += 1

    def pages(self, length: int) -> None:
        self.sections += 1
        self.page_sections += 1
        self.page_bytes += length

    def end(self) -> End:
        return End(self.sections, self.page_sections, self.page_bytes)


# -- decoding -------------------------------------------------------------------------------


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
    SectionType.END: 3,
    SectionType.ROUND: 2,
    SectionType.PAGE_LIST: 2,
}


class Decoder:
    """Pull-based parser of one stream (see the module docstring for the protocol).

    ``sparse_ok``: accept the SPARSE flag (and PAGES_AT sections); only a seekable
    snapshot file can honour it. ``limits``: the receiver's own caps (module rules), never
    above the format's. Every error raises :class:`StreamError` and leaves the
    decoder unusable.
    """

    def __init__(
        self, *, sparse_ok: bool = False, limits: Limits | None = None, live_ok: bool = False
    ) -> None:
        self._sparse_ok = sparse_ok
        self._live_ok = live_ok
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
