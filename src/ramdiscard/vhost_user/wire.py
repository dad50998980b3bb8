"""vhost-user message codec, sans-I/O.

Rules:

* A message is a 12-byte little-endian header (request u32, flags u32, size u32) and
  ``size`` payload bytes; file descriptors travel beside it (SCM_RIGHTS). Flags: version
  1 in bits 0-1 (anything else is refused), REPLY (bit 2), NEED_REPLY (bit 3); other bits
  must be zero.
* :class:`MessageDecoder` is fed bytes and descriptors as they arrive and yields complete
  :class:`Message`\\ s. Descriptors belong to the last message that starts (or
  continues) in the chunk they came with: a frontend sends a message and its descriptors
  in one sendmsg, and the kernel ends a receive right after a descriptor-carrying chunk. A header with
  a bad version, unknown flag bits or a payload larger than :data:`MAX_PAYLOAD` raises
  :class:`WireError`; the decoder is then unusable (the connection must be dropped) and
  every descriptor it still held is returned by :meth:`MessageDecoder.take_fds` so the
  caller closes it.
* Payload decoders (``decode_*``) check the exact size (or the declared inner sizes) and
  raise WireError on any mismatch; they never read past the payload.
* Encoders produce exact bytes; replies carry the REPLY flag and version 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from ramdiscard.errors import ProtocolViolation

HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
KNOWN_FLAGS = FLAG_VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY
MAX_PAYLOAD = 4096
"""Largest payload accepted; the largest legitimate one (a memory table) is 264 bytes."""
MAX_FDS = 8
MAX_MEM_REGIONS = 8
MAX_CONFIG_SIZE = 256
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

F_PROTOCOL_FEATURES = 1 << 30
"""VHOST_USER_F_PROTOCOL_FEATURES, a virtio feature bit in GET_FEATURES."""


class Request(IntEnum):
    """Frontend -> backend requests (the subset this backend knows by name)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_BACKEND_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    SET_STATUS = 39
    GET_STATUS = 40


class BackendRequest(IntEnum):
    """Backend -> frontend requests on the backend channel."""

    CONFIG_CHANGE_MSG = 2


class ProtocolFeature(IntEnum):
    """Bit numbers of vhost-user protocol features."""

    MQ = 0
    REPLY_ACK = 3
    BACKEND_REQ = 5
    CONFIG = 9
    RESET_DEVICE = 13
    STATUS = 16


def protocol_features(*bits: ProtocolFeature) -> int:
    mask = 0
    for bit in bits:
        mask |= 1 << bit
    return mask


class WireError(ProtocolViolation):
    """A malformed vhost-user message; the connection that sent it must be dropped."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message: request number, flags, payload and the descriptors that came with it.

    The receiver owns ``fds`` and must close every one it does not keep."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = field(default=())

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """(request, flags, size) of a 12-byte header. Raises WireError for a short header,
    a version other than 1, unknown flag bits or ``size`` > MAX_PAYLOAD."""
    if len(data) < HEADER_SIZE:
        raise WireError(f"short vhost-user header: {len(data)} bytes, need {HEADER_SIZE}")
    request, flags, size = HEADER.unpack_from(data)
    if flags & FLAG_VERSION_MASK != VERSION:
        raise WireError(f"unsupported vhost-user version {flags & FLAG_VERSION_MASK} (flags {flags:#x})")
    if flags & ~KNOWN_FLAGS:
        raise WireError(f"unknown vhost-user flag bits {flags & ~KNOWN_FLAGS:#x}")
    if size > MAX_PAYLOAD:
        raise WireError(f"vhost-user payload of {size} bytes exceeds the {MAX_PAYLOAD}-byte limit")
    return request, flags, size


def encode(request: int, payload: bytes = b"", *, flags: int = VERSION) -> bytes:
    """Header and payload of one message."""
    if len(payload) > MAX_PAYLOAD:
        raise WireError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, flags=VERSION | FLAG_REPLY)


class MessageDecoder:
    """Incremental decoder; see the module rules."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0]
        self._fds: dict[int, list[int]] = {}  # message start offset -> its descriptors
        self._failed: WireError | None = None

    def _last_start(self) -> int:
        """Offset in the buffer of the last message that starts in it (the one a
        descriptor-carrying receive ends in: the kernel ends a receive after such a chunk)."""
        off = 0
        while len(self._buf) - off >= HEADER_SIZE:
            _r, _f, size = parse_header(self._buf[off:])
            if off + HEADER_SIZE + size >= len(self._buf):
                break
            off += HEADER_SIZE + size
        return off

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Add received bytes and descriptors; returns the messages now complete.

        Descriptors belong to the last message that starts (or continues) in ``data``.
        Raises WireError for a malformed header or more than MAX_FDS descriptors on one
        message (then and on every later call)."""
        if self._failed is not None:
            self._fds.setdefault(self._base, []).extend(fds)
            raise self._failed
        self._buf += data
        out: list[Message] = []
        try:
            if fds:
                try:
                    key = self._base + self._last_start()
                except WireError:
                    self._fds.setdefault(self._base, []).extend(fds)
                    raise
                self._fds.setdefault(key, []).extend(fds)
            while len(self._buf) >= HEADER_SIZE:
                request, flags, size = parse_header(self._buf)
                if len(self._buf) < HEADER_SIZE + size:
                    break
                mine = self._fds.get(self._base, [])
                if len(mine) > MAX_FDS:
                    raise WireError(f"{len(mine)} descriptors with one message, at most {MAX_FDS}")
                self._fds.pop(self._base, None)
                payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + size])
                del self._buf[: HEADER_SIZE + size]
                self._base += HEADER_SIZE + size
                out.append(Message(request, flags, payload, tuple(mine)))
        except WireError as exc:
            self._failed = exc
            for message in out:
                self._fds.setdefault(self._base, []).extend(message.fds)
            raise
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf)

    def take_fds(self) -> list[int]:
        """Descriptors held for incomplete (or failed) messages; the caller closes them."""
        fds = [fd for key in sorted(self._fds) for fd in self._fds[key]]
        self._fds = {}
        return fds


# -- payloads ------------------------------------------------------------------------------

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")


def _exact(msg: Message, size: int) -> None:
    if len(msg.payload) != size:
        raise WireError(f"{msg.name()}: payload of {len(msg.payload)} bytes, expected {size}")


def decode_u64(msg: Message) -> int:
    _exact(msg, U64.size)
    value: int = U64.unpack(msg.payload)[0]
    return value


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


@dataclass(frozen=True, slots=True)
class VringState:
    index: int
    num: int


def decode_vring_state(msg: Message) -> VringState:
    _exact(msg, VRING_STATE.size)
    return VringState(*VRING_STATE.unpack(msg.payload))


def encode_vring_state(state: VringState) -> bytes:
    return VRING_STATE.pack(state.index, state.num)


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses in the frontend's virtual address space (translated through the
    memory table's ``userspace_addr``)."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


def decode_vring_addr(msg: Message) -> VringAddr:
    _exact(msg, VRING_ADDR.size)
    return VringAddr(*VRING_ADDR.unpack(msg.payload))


def encode_vring_addr(addr: VringAddr) -> bytes:
    return VRING_ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


@dataclass(frozen=True, slots=True)
class MemRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


def decode_mem_table(msg: Message) -> list[MemRegion]:
    """Regions of SET_MEM_TABLE: u32 count, u32 padding, then ``count`` regions; the
    count must be 1..8, the payload exactly that long and one descriptor per region."""
    if len(msg.payload) < 8:
        raise WireError(f"SET_MEM_TABLE: payload of {len(msg.payload)} bytes is shorter than its count")
    (count,) = struct.unpack_from("<I", msg.payload)
    if not 1 <= count <= MAX_MEM_REGIONS:
        raise WireError(f"SET_MEM_TABLE: {count} regions, expected 1..{MAX_MEM_REGIONS}")
    expected = 8 + count * MEM_REGION.size
    if len(msg.payload) < expected:
        raise WireError(
            f"SET_MEM_TABLE: payload of {len(msg.payload)} bytes, {count} regions need {expected}"
        )
    if len(msg.fds) != count:
        raise WireError(f"SET_MEM_TABLE: {count} regions but {len(msg.fds)} descriptors")
    return [MemRegion(*MEM_REGION.unpack_from(msg.payload, 8 + i * MEM_REGION.size)) for i in range(count)]


def encode_mem_table(regions: list[MemRegion]) -> bytes:
    out = struct.pack("<II", len(regions), 0)
    for r in regions:
        out += MEM_REGION.pack(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
    return out


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    offset: int
    size: int
    flags: int
    data: bytes


def decode_config(msg: Message) -> ConfigPayload:
    """GET_CONFIG/SET_CONFIG: u32 offset, u32 size, u32 flags, ``size`` bytes (at most
    MAX_CONFIG_SIZE), exactly."""
    if len(msg.payload) < CONFIG_HEADER.size:
        raise WireError(f"{msg.name()}: payload of {len(msg.payload)} bytes is shorter than its header")
    offset, size, flags = CONFIG_HEADER.unpack_from(msg.payload)
    if size > MAX_CONFIG_SIZE:
        raise WireError(f"{msg.name()}: config size {size} exceeds {MAX_CONFIG_SIZE}")
    _exact(msg, CONFIG_HEADER.size + size)
    return ConfigPayload(offset, size, flags, msg.payload[CONFIG_HEADER.size :])


def encode_config(config: ConfigPayload) -> bytes:
    return CONFIG_HEADER.pack(config.offset, len(config.data), config.flags) + config.data


def decode_vring_fd(msg: Message) -> tuple[int, int | None]:
    """SET_VRING_KICK/CALL/ERR: (queue index, descriptor or None when the no-fd bit is
    set). Exactly one descriptor must come without the bit, none with it."""
    value = decode_u64(msg)
    index = value & VRING_IDX_MASK
    if value & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
        raise WireError(f"{msg.name()}: unknown bits in {value:#x}")
    if value & VRING_NOFD_MASK:
        if msg.fds:
            raise WireError(f"{msg.name()}: descriptor sent with the no-fd flag")
        return index, None
    if len(msg.fds) != 1:
        raise WireError(f"{msg.name()}: expected one descriptor, got {len(msg.fds)}")
    return index, msg.fds[0]
