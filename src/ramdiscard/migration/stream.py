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
  Stop-and-copy streams are valid live-stream input too. A postcopy's live stream
  (accepted only with ``postcopy_ok``) may end with one POSTCOPY section per region, in
  region order, right before END: the switchover (:class:`Handover`).
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

from ramdiscard.errors import ProtocolViolation, RamDiscardError
from ramdiscard.migration.checksum import Checksum, digest
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
    POSTCOPY = 8


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


@dataclass(frozen=True, slots=True)
class Handover:
    """Postcopy switchover (live streams of a postcopy): the runs of region ``region``
    the destination must receive after the switchover (it drops what it holds of them)."""

    region: int
    runs: tuple[tuple[int, int], ...]


Event = StreamHeader | RegionInfo | DeviceState | PageData | Round | End | PageList | Handover

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
HANDOVER_SUB = struct.Struct("<IIQ")  # region, reserved, run count; count x (u64 offset, u64 length)


def encode_handover(region: int, runs: list[tuple[int, int]]) -> bytes:
    """A POSTCOPY section: ``runs`` (ascending, disjoint, 4 KiB aligned) of ``region``."""
    flat = [v for run in runs for v in run]
    payload = HANDOVER_SUB.pack(region, 0, len(runs)) + struct.pack(f"<{len(flat)}Q", *flat)
    return section(SectionType.POSTCOPY, payload)


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
