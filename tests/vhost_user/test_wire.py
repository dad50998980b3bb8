"""vhost-user codec: exact encoding, incremental decoding, hostile headers and payloads."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.vhost_user import wire
from ramdiscard.vhost_user.wire import Message, MessageDecoder, Request, WireError

REQUESTS = st.integers(min_value=0, max_value=2**32 - 1)
PAYLOADS = st.binary(max_size=300)


@given(REQUESTS, PAYLOADS, st.sampled_from([wire.VERSION, wire.VERSION | wire.FLAG_NEED_REPLY]))
def test_roundtrip(request: int, payload: bytes, flags: int) -> None:
    data = wire.encode(request, payload, flags=flags)
    assert len(data) == wire.HEADER_SIZE + len(payload)
    (msg,) = MessageDecoder().feed(data)
    assert (msg.request, msg.flags, msg.payload, msg.fds) == (request, flags, payload, ())
    assert msg.need_reply == bool(flags & wire.FLAG_NEED_REPLY)


@given(st.lists(st.tuples(REQUESTS, PAYLOADS), min_size=1, max_size=5), st.data())
def test_any_split_decodes_the_same(messages: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(wire.encode(r, p) for r, p in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    decoder = MessageDecoder()
    out: list[Message] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out += decoder.feed(stream[last:cut])
        last = cut
    assert [(m.request, m.payload) for m in out] == messages
    assert decoder.pending == 0


def test_fds_belong_to_the_message_they_came_with() -> None:
    decoder = MessageDecoder()
    first = wire.encode(Request.SET_VRING_KICK, struct.pack("<Q", 0))
    assert decoder.feed(first[:5], [7]) == []
    (msg,) = decoder.feed(first[5:] + wire.encode(Request.GET_FEATURES))[:1]
    assert msg.fds == (7,)
    assert decoder.take_fds() == []


@given(st.binary(min_size=12, max_size=40))
def test_hostile_header_refused_or_decoded(data: bytes) -> None:
    decoder = MessageDecoder()
    try:
        out = decoder.feed(data, [100, 101])
    except WireError as exc:
        assert "\n" not in str(exc)
        assert decoder.take_fds() == [100, 101]
        with pytest.raises(WireError):
            decoder.feed(b"")
        return
    _, flags, size = struct.unpack_from("<III", data)
    assert flags & 3 == 1 and not flags & ~0xF and size <= wire.MAX_PAYLOAD
    assert sum(len(m.fds) for m in out) + len(decoder.take_fds()) == 2


@pytest.mark.parametrize(
    ("flags", "size", "match"),
    [(0, 0, "version"), (2, 0, "version"), (1 | 0x10, 0, "flag"), (1, wire.MAX_PAYLOAD + 1, "exceeds")],
)
def test_bad_headers(flags: int, size: int, match: str) -> None:
    with pytest.raises(WireError, match=match):
        MessageDecoder().feed(struct.pack("<III", 1, flags, size))


def test_too_many_fds_refused() -> None:
    decoder = MessageDecoder()
    with pytest.raises(WireError, match="descriptors"):
        decoder.feed(wire.encode(Request.SET_OWNER), list(range(9)))
    assert decoder.take_fds() == list(range(9))


def _msg(request: int, payload: bytes, fds: tuple[int, ...] = ()) -> Message:
    return Message(request, wire.VERSION, payload, fds)


@given(st.binary(max_size=300), st.integers(0, 9))
def test_payload_decoders_never_read_past(payload: bytes, nfds: int) -> None:
    fds = tuple(range(nfds))
    for request, decode in (
        (Request.SET_FEATURES, wire.decode_u64),
        (Request.SET_VRING_NUM, wire.decode_vring_state),
        (Request.SET_VRING_ADDR, wire.decode_vring_addr),
        (Request.SET_MEM_TABLE, wire.decode_mem_table),
        (Request.GET_CONFIG, wire.decode_config),
        (Request.SET_VRING_KICK, wire.decode_vring_fd),
    ):
        try:
            decode(_msg(request, payload, fds))  # type: ignore[operator]
        except WireError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=50)
@given(
    st.lists(
        st.builds(
            wire.MemRegion,
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
            st.integers(0, 2**64 - 1),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_mem_table_roundtrip(regions: list[wire.MemRegion]) -> None:
    msg = _msg(Request.SET_MEM_TABLE, wire.encode_mem_table(regions), tuple(range(len(regions))))
    assert wire.decode_mem_table(msg) == regions


def test_mem_table_needs_one_fd_per_region() -> None:
    region = wire.MemRegion(0, 4096, 0x7000, 0)
    with pytest.raises(WireError, match="descriptors"):
        wire.decode_mem_table(_msg(Request.SET_MEM_TABLE, wire.encode_mem_table([region]), ()))


def test_config_roundtrip_and_bounds() -> None:
    cfg = wire.ConfigPayload(8, 4, 0, b"abcd")
    assert wire.decode_config(_msg(Request.SET_CONFIG, wire.encode_config(cfg))) == cfg
    with pytest.raises(WireError, match="exceeds"):
        wire.decode_config(_msg(Request.GET_CONFIG, struct.pack("<III", 0, 257, 0) + bytes(257)))
    with pytest.raises(WireError, match="expected"):
        wire.decode_config(_msg(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(4)))


def test_vring_fd_nofd_bit() -> None:
    assert wire.decode_vring_fd(_msg(Request.SET_VRING_CALL, struct.pack("<Q", 0x100))) == (0, None)
    r, w = os.pipe()
    try:
        assert wire.decode_vring_fd(_msg(Request.SET_VRING_CALL, struct.pack("<Q", 0), (r,))) == (0, r)
    finally:
        os.close(r)
        os.close(w)
    with pytest.raises(WireError, match="no-fd"):
        wire.decode_vring_fd(_msg(Request.SET_VRING_CALL, struct.pack("<Q", 0x100), (3,)))
    with pytest.raises(WireError, match="unknown bits"):
        wire.decode_vring_fd(_msg(Request.SET_VRING_CALL, struct.pack("<Q", 0x200)))


def test_fds_go_to_the_last_message_of_a_coalesced_receive() -> None:
    # Three messages arrive in one receive; the kernel delivers the descriptors of the
    # last one (the chunk that carried them ends the receive).
    stream = wire.encode(Request.SET_OWNER) + wire.encode(Request.SET_FEATURES, bytes(8))
    stream += wire.encode(Request.SET_BACKEND_REQ_FD)
    out = MessageDecoder().feed(stream, [9])
    assert [m.fds for m in out] == [(), (), (9,)]
