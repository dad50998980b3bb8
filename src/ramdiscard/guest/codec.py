"""The guest driver's own virtio-mem wire codec (independent of the device's).

Rules (virtio-mem.md §1):

* A request is 24 device-readable bytes: ``le16 type``, 6 bytes padding, ``le64 addr``,
  ``le16 nb_blocks``, 6 bytes padding. The driver offers a 10-byte device-writable
  response buffer and reads only the ``le16 type`` at its start; a used length shorter
  than that is an unknown answer (-1).
* The config space is 56 bytes; :meth:`Config.unpack` reads the first 56 and raises
  ValueError for fewer.
* Unknown response codes are kept as ints, not mapped to :class:`RespType`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

CONFIG = struct.Struct("<QH6xQQQQQ")
REQUEST = struct.Struct("<H6xQH6x")
RESPONSE_TYPE = struct.Struct("<H")
RESPONSE_SIZE = 10
MAX_NB_BLOCKS = 0xFFFF


class ReqType(IntEnum):
    PLUG = 0
    UNPLUG = 1
    UNPLUG_ALL = 2
    STATE = 3


class RespType(IntEnum):
    ACK = 0
    NACK = 1
    BUSY = 2
    ERROR = 3


@dataclass(frozen=True, slots=True)
class Config:
    """The device config as the driver read it."""

    block_size: int
    node_id: int
    addr: int
    region_size: int
    usable_region_size: int
    plugged_size: int
    requested_size: int

    @classmethod
    def unpack(cls, data: bytes) -> Config:
        if len(data) < CONFIG.size:
            raise ValueError(f"virtio-mem config is {CONFIG.size} bytes, got {len(data)}")
        return cls(*CONFIG.unpack_from(data))


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request and the device's answer. ``response`` is None when the device raised."""

    type: ReqType
    addr: int
    nb_blocks: int
    response: RespType | int | None
    time: float

    def pack(self) -> bytes:
        return REQUEST.pack(int(self.type), self.addr, self.nb_blocks)

    @property
    def response_name(self) -> str:
        """The response's name (``ACK``, ...), or its raw code or ``None`` as text."""
        return self.response.name if isinstance(self.response, RespType) else str(self.response)

    def __str__(self) -> str:
        resp = self.response_name
        if self.type is ReqType.UNPLUG_ALL:
            return f"UNPLUG_ALL -> {resp}"
        return f"{self.type.name} addr={self.addr:#x} nb_blocks={self.nb_blocks} -> {resp}"


_RESPONSE_CODES = RespType._value2member_map_


def encode_request(rtype: ReqType, gpa: int, nb_blocks: int) -> bytes:
    """The 24 request bytes (``nb_blocks`` at most 0xFFFF)."""
    return REQUEST.pack(int(rtype), gpa, nb_blocks)


def decode_response(data: bytes) -> RespType | int:
    """The response type at the start of ``data``: a RespType, the raw code when unknown,
    or -1 when ``data`` is too short to hold one."""
    if len(data) < RESPONSE_TYPE.size:
        return -1
    raw = RESPONSE_TYPE.unpack_from(data)[0]
    code = _RESPONSE_CODES.get(raw)
    return code if isinstance(code, RespType) else raw
