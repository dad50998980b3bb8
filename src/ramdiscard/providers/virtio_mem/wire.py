"""virtio-mem wire formats (sans-I/O): requests, responses, the config space, feature bits.

Rules:

* Everything is little-endian. A request is 24 bytes: ``type`` le16 @0, 6 bytes padding,
  then ``addr`` le64 @8, ``nb_blocks`` le16 @16, 6 bytes padding. A response is 10 bytes:
  ``type`` le16 @0, 6 bytes padding, ``state`` le16 @8 (meaningful for STATE only). The
  config space is 56 bytes (see :class:`ConfigSpace`).
* Parsing ignores every padding byte and anything after the first 24 bytes of a request
  (D-PLUG-1/2, D-UNPLUG-1/2, D-UA-1/2, D-ST-1/2): the device reads only the type and the
  request-specific data.
* A request shorter than 24 bytes or of an unknown type is a *protocol violation*, not a
  request that gets an answer: :meth:`Request.parse` raises :class:`ProtocolError` and the
  device treats it as QEMU's ``virtio_error`` (the device is broken until reset).
* Values a caller builds are range-checked (u16/u64), so :meth:`Request.pack` never
  produces something the guest could not have sent.

Theory of operation: the device model works on :class:`Request` values and answers
:class:`Response` values; only :meth:`VirtioMem.handle_request` touches bytes. Nothing here
does I/O or keeps state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from ramdiscard.errors import ProtocolViolation, RamDiscardError

VIRTIO_ID_MEM = 24
"""virtio device ID of the memory device."""

VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1
VIRTIO_MEM_F_PERSISTENT_SUSPEND = 2

REQUEST_SIZE = 24
RESPONSE_SIZE = 10
CONFIG_SIZE = 56
MAX_NB_BLOCKS = 0xFFFF
U64_MAX = (1 << 64) - 1

_REQUEST = struct.Struct("<H6xQH6x")
_RESPONSE = struct.Struct("<H6xH")
_CONFIG = struct.Struct("<QH6xQQQQQ")
assert _REQUEST.size == REQUEST_SIZE and _RESPONSE.size == RESPONSE_SIZE and _CONFIG.size == CONFIG_SIZE


def feature_bit(bit: int) -> int:
    """The feature mask of feature number ``bit``."""
    return 1 << bit


class VirtioMemError(RamDiscardError):
    """Base class of virtio-mem device errors."""


class ProtocolError(VirtioMemError, ProtocolViolation):
    """The driver violated the transport protocol (short request, unknown request type).

    QEMU answers such a request with ``virtio_error``: no response, device broken until
    reset. The device raises this instead of answering.
    """


class DeviceBroken(ProtocolError):
    """The device is broken after a protocol violation; it serves no request until reset."""


class RequestType(IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class ResponseType(IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


class BlockState(IntEnum):
    PLUGGED = 0
    UNPLUGGED = 1
    MIXED = 2


@dataclass(frozen=True, slots=True)
class Request:
    """One guest request. ``addr``/``nb_blocks`` are 0 and ignored for UNPLUG_ALL."""

    type: RequestType
    addr: int = 0
    nb_blocks: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.addr <= U64_MAX:
            raise ValueError(f"request addr {self.addr:#x} does not fit in 64 bits")
        if not 0 <= self.nb_blocks <= MAX_NB_BLOCKS:
            raise ValueError(f"request nb_blocks {self.nb_blocks} does not fit in 16 bits")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> Request:
        """Decode the first 24 bytes of ``data``; padding and trailing bytes are ignored.

        Raises ProtocolError for fewer than 24 bytes or an unknown request type.
        """
        rtype, addr, nb_blocks = parse_request(data)
        # The struct's u64 and u16 fields are the ranges __post_init__ checks, so the
        # request is built without running that check a second time (one per request).
        req = _new_request(cls)
        _set_type(req, rtype)
        _set_addr(req, addr)
        _set_nb_blocks(req, nb_blocks)
        return req

    def pack(self) -> bytes:
        return _REQUEST.pack(int(self.type), self.addr, self.nb_blocks)


_REQUEST_TYPES = {int(t): t for t in RequestType}


def parse_request(data: bytes | bytearray | memoryview) -> tuple[RequestType, int, int]:
    """:meth:`Request.parse` as its fields ``(type, addr, nb_blocks)``, without building a
    Request (the device's byte path); same checks, same errors."""
    if len(data) < REQUEST_SIZE:
        raise ProtocolError(f"virtio-mem request too short: {len(data)} bytes, need {REQUEST_SIZE}")
    raw_type, addr, nb_blocks = _REQUEST.unpack_from(data)
    # A dict lookup, not RequestType(raw_type): the enum call is ~10x slower.
    rtype = _REQUEST_TYPES.get(raw_type)
    if rtype is None:
        raise ProtocolError(f"virtio-mem: unknown request type {raw_type}")
    if rtype is _UNPLUG_ALL:
        return rtype, 0, 0
    return rtype, addr, nb_blocks


_UNPLUG_ALL = RequestType.UNPLUG_ALL
_new_request = object.__new__
_set_type = Request.__dict__["type"].__set__
_set_addr = Request.__dict__["addr"].__set__
_set_nb_blocks = Request.__dict__["nb_blocks"].__set__


@dataclass(frozen=True, slots=True)
class Response:
    """One device response. ``state`` is set only for an ACKed STATE request."""

    type: ResponseType
    state: BlockState | None = None

    def pack(self) -> bytes:
        if self.state is None:
            return PACKED_RESPONSES[self.type]
        return _RESPONSE.pack(int(self.type), int(self.state))

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, *, request: RequestType | None = None) -> Response:
        """Decode a response. The state field is kept only when ``request`` is STATE and the
        type is ACK (R-ST-1/2). Raises ProtocolError for a short buffer or unknown values."""
        if len(data) < RESPONSE_SIZE:
            raise ProtocolError(f"virtio-mem response too short: {len(data)} bytes, need {RESPONSE_SIZE}")
        raw_type, raw_state = _RESPONSE.unpack_from(data)
        try:
            rtype = ResponseType(raw_type)
        except ValueError:
            raise ProtocolError(f"virtio-mem: unknown response type {raw_type}") from None
        if request is RequestType.STATE and rtype is ResponseType.ACK:
            try:
                return cls(rtype, BlockState(raw_state))
            except ValueError:
                raise ProtocolError(f"virtio-mem: unknown block state {raw_state}") from None
        return cls(rtype)


PACKED_RESPONSES = {t: _RESPONSE.pack(int(t), 0) for t in ResponseType}
"""The packed response of each type without a block state."""


@dataclass(frozen=True, slots=True)
class ConfigSpace:
    """The 56-byte device configuration (read-only for the driver)."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    def pack(self) -> bytes:
        return _CONFIG.pack(
            self.block_size,
            self.node_id,
            self.addr,
            self.region_size,
            self.usable_region_size,
            self.plugged_size,
            self.requested_size,
        )

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> ConfigSpace:
        """Decode 56 bytes (padding ignored). Raises ValueError for a wrong length."""
        if len(data) != CONFIG_SIZE:
            raise ValueError(f"virtio-mem config is {CONFIG_SIZE} bytes, got {len(data)}")
        return cls(*_CONFIG.unpack(data))
