"""The sans-I/O stream format: encoder and decoder without any memory or I/O."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard.migration.checksum import Checksum, address, available, digest
from ramdiscard.migration.decoder import Decoder
from ramdiscard.migration.stream import (
    Counter,
    DeviceState,
    End,
    PageData,
    RegionInfo,
    RegionKind,
    StreamError,
    StreamFlags,
    StreamHeader,
    encode_device,
    encode_end,
    encode_pages_at,
    encode_region,
    encode_stream_header,
    page_header,
)

R0 = RegionInfo(0, RegionKind.WHOLE, 1 << 20, 0, 4096, "pc.ram", "")
R1 = RegionInfo(1, RegionKind.MANAGED, 8 << 20, 4 << 30, 4096, "vmem0-ram", "vmem0")


def _decode(data: bytes, sparse_ok: bool = False) -> list[object]:
    dec, pos, events = Decoder(sparse_ok=sparse_ok), 0, []
    while not dec.done:
        need = dec.need()
        if need == 0:
            page = events[-1]
            assert isinstance(page, PageData)
            dec.page_done(data[pos : pos + page.length])
            pos += page.length
            continue
        if pos + need > len(data):
            raise StreamError("truncated")
        event = dec.feed(data[pos : pos + need])
        pos += need
        if event is not None:
            events.append(event)
    assert pos == len(data)
    return events


def _stream(pages: list[tuple[int, int, bytes]], end: End | None = None) -> bytes:
    c = Counter()
    out = [encode_stream_header(), encode_region(R0), encode_region(R1), encode_device(1, b"state")]
    c.meta(), c.meta(), c.meta()
    for region, offset, data in pages:
        out += [page_header(region, offset, data), data]
        c.pages(len(data))
    out.append(encode_end(end or c.end()))
    return b"".join(out)


def test_round_trip_events() -> None:
    data = b"\xab" * 8192
    events = _decode(_stream([(0, 0, data), (1, 4096, data), (1, 3 << 20, data)]))
    assert events[0] == StreamHeader(1, StreamFlags.NONE, Checksum.CRC32)
    assert events[1:3] == [R0, R1]
    assert events[3] == DeviceState(1, b"state")
    assert events[4:7] == [PageData(0, 0, 8192), PageData(1, 4096, 8192), PageData(1, 3 << 20, 8192)]
    assert events[7] == End(6, 3, 3 * 8192)


@pytest.mark.parametrize(
    "pages",
    [
        [(1, 0, b"x" * 4096), (0, 0, b"x" * 4096)],  # regions out of order
        [(1, 8192, b"x" * 4096), (1, 4096, b"x" * 4096)],  # offsets descending
        [(1, 0, b"x" * 8192), (1, 4096, b"x" * 4096)],  # overlap
        [(2, 0, b"x" * 4096)],  # unknown region
    ],
)
def test_page_order_enforced(pages: list[tuple[int, int, bytes]]) -> None:
    with pytest.raises(StreamError):
        _decode(_stream(pages))


def test_end_must_match() -> None:
    with pytest.raises(StreamError, match="END section disagrees"):
        _decode(_stream([(0, 0, b"y" * 4096)], End(4, 1, 8192)))


def test_sections_out_of_order() -> None:
    data = encode_stream_header() + encode_device(0, b"s") + encode_region(R0)
    with pytest.raises(StreamError, match="DEVICE section before any REGION"):
        _decode(data + encode_end(End(2, 0, 0)))
    data = encode_stream_header() + encode_region(R0) + encode_device(0, b"s") + encode_region(R1)
    with pytest.raises(StreamError, match="out of order"):
        _decode(data)


def test_sparse_needs_a_seekable_file_and_pages_at() -> None:
    c = Counter()
    parts = [encode_stream_header(StreamFlags.SPARSE), encode_region(R0)]
    c.meta()
    parts.append(encode_pages_at(0, 0, 4096, 1 << 20, 0))
    c.pages(4096)
    parts.append(encode_end(c.end()))
    data = b"".join(parts)
    with pytest.raises(StreamError, match="seekable"):
        _decode(data)
    dec = Decoder(sparse_ok=True)
    pos, events = 0, []
    while not dec.done:
        n = dec.need()
        ev = dec.feed(data[pos : pos + n])
        pos += n
        if ev is not None:
            events.append(ev)
    assert PageData(0, 0, 4096, 1 << 20, 0) in events
    # PAGES inside a sparse stream, PAGES_AT inside a plain one: refused.
    with pytest.raises(StreamError):
        _decode(encode_stream_header() + encode_region(R0) + encode_pages_at(0, 0, 4096, 0, 0))


def test_feed_contract() -> None:
    dec = Decoder()
    with pytest.raises(StreamError, match="expected 20"):
        dec.feed(b"short")


@pytest.mark.parametrize("algo", list(Checksum))
def test_page_checksum_algorithms(algo: Checksum) -> None:
    if algo not in available():
        pytest.skip(f"{algo.name} is not available on this host (libxxhash missing)")
    data = bytes(range(256)) * 32
    c = Counter()
    parts = [encode_stream_header(StreamFlags.NONE, algo), encode_region(R0)]
    c.meta()
    parts += [page_header(0, 0, data, algo), data]
    c.pages(len(data))
    parts.append(encode_end(c.end()))
    stream = b"".join(parts)
    assert _decode(stream)[0] == StreamHeader(1, StreamFlags.NONE, algo)
    bad = bytearray(stream)
    bad[-len(data) - 100] ^= 4  # inside the page data
    with pytest.raises(StreamError, match="checksum"):
        _decode(bytes(bad))
    assert digest(algo, data, 1) != digest(algo, data, 2)


def test_unknown_checksum_algorithm_refused() -> None:
    with pytest.raises(StreamError, match="unknown page checksum algorithm 7"):
        _decode(encode_stream_header(StreamFlags.NONE, 7))  # type: ignore[arg-type]


@pytest.mark.parametrize("algo", [a for a in Checksum if a in available()])
@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(min_value=1, max_value=8191), max_size=6), at=st.booleans())
def test_page_data_in_pieces(algo: Checksum, cuts: list[int], at: bool) -> None:
    """Page data handed over in pieces (as a receiver does while it lands) is checked
    exactly like the whole; too much or too little data is refused."""
    data = bytes(i % 253 for i in range(8192))
    c = Counter()
    head = encode_stream_header(StreamFlags.NONE, algo) + encode_region(R0)
    c.meta()
    head += page_header(0, 4096, data, algo)
    c.pages(len(data))
    tail = encode_end(c.end())

    def run(payload: bytes, pieces: list[int], finish: bool = True) -> None:
        dec, pos = Decoder(), 0
        while dec.need():
            n = dec.need()
            dec.feed(head[pos : pos + n])
            pos += n
        assert pos == len(head)
        buf = bytearray(payload)
        base = address(memoryview(buf))
        points = [0, *sorted(set(pieces)), len(buf)]
        for a, b in itertools.pairwise(points):
            if at:
                dec.page_update_at(base + a, b - a)
            else:
                dec.page_update(buf[a:b])
        if finish:
            dec.page_done()
            assert dec.feed(tail[:28]) is None
            assert dec.feed(tail[28:]) == c.end()
            assert dec.done

    run(data, cuts)
    corrupt = bytearray(data)
    corrupt[cuts[0] if cuts else 0] ^= 0x40
    with pytest.raises(StreamError, match="checksum mismatch"):
        run(bytes(corrupt), cuts)
    with pytest.raises(StreamError, match="bytes of page data for a section of 8192"):
        run(data + b"\0", cuts)
    with pytest.raises(StreamError, match="page_done after 8191 bytes"):
        run(data[:-1], cuts)


def test_live_stream_interleaves_and_is_refused_by_old_readers() -> None:
    from ramdiscard.migration.decoder import Decoder
    from ramdiscard.migration.stream import (
        DeviceState,
        Round,
        StreamFlags,
        encode_device,
        encode_end,
        encode_round,
        encode_stream_header,
    )

    info = RegionInfo(0, RegionKind.MANAGED, 8192, 0, 4096, "r", "d")
    page = bytes(4096)
    body = [
        encode_stream_header(StreamFlags.LIVE),
        encode_region(info),
        encode_device(0, b"s1"),
        page_header(0, 4096, page) + page,
        encode_round(1, 4096),
        page_header(0, 4096, page) + page,
        encode_device(0, b"s2"),
        encode_end(End(6, 2, 8192)),
    ]
    blob = b"".join(body)
    events = []
    dec = Decoder(live_ok=True)
    pos = 0
    while not dec.done:
        need = dec.need()
        if need == 0:
            pending = events[-1]
            dec.page_done(blob[pos : pos + pending.length])
            pos += pending.length
            continue
        ev = dec.feed(blob[pos : pos + need])
        pos += need
        if ev is not None:
            events.append(ev)
    kinds = [type(e).__name__ for e in events]
    assert kinds == [
        "StreamHeader", "RegionInfo", "DeviceState", "PageData", "Round", "PageData", "DeviceState", "End"
    ]  # fmt: skip
    assert events[4] == Round(1, 4096)
    assert isinstance(events[6], DeviceState) and events[6].state == b"s2"
    with pytest.raises(StreamError, match="flags"):
        Decoder().feed(body[0])
    plain = Decoder()
    plain.feed(encode_stream_header())
    with pytest.raises(StreamError, match="ROUND section out of order"):
        plain.feed(encode_round(1, 0)[:28])


def _live_events(blob: bytes) -> list[object]:
    dec, pos, events = Decoder(live_ok=True), 0, []
    while not dec.done:
        need = dec.need()
        ev = dec.feed(blob[pos : pos + need])
        pos += need
        if ev is not None:
            events.append(ev)
    return events


def _page_list_stream(offsets: list[int], data: bytes, tamper: int | None = None) -> bytes:
    from ramdiscard.migration.stream import page_list_header

    info = RegionInfo(0, RegionKind.WHOLE, 1 << 20, 0, 4096, "pc.ram", "")
    header = page_list_header(0, offsets, data, Checksum.CRC32)
    body = bytearray(header + data)
    if tamper is not None:
        body[tamper] ^= 1
    n = len(offsets) * 4096
    return b"".join(
        [encode_stream_header(StreamFlags.LIVE), encode_region(info), bytes(body), encode_end(End(2, 1, n))]
    )


def test_page_list_round_trip_and_refusals() -> None:
    from ramdiscard.migration.stream import PageList, page_list_header

    data = bytes(range(256)) * 16 + b"\x07" * 4096 + b"\x09" * 4096
    events = _live_events(_page_list_stream([0, 8192, 65536], data))
    lists = [e for e in events if isinstance(e, PageList)]
    assert lists == [PageList(0, (0, 8192, 65536), data)]
    assert events[-1] == End(2, 1, 3 * 4096)
    with pytest.raises(StreamError, match="checksum mismatch"):
        _live_events(_page_list_stream([0, 8192, 65536], data, tamper=-5))
    for bad, why in (
        ([8192, 0, 65536], "not ascending"),
        ([0, 8192, 8192], "not ascending"),
        ([0, 100, 65536], "aligned"),
    ):
        with pytest.raises(StreamError, match=why):
            _live_events(_page_list_stream(bad, data))
    plain = Decoder()
    plain.feed(encode_stream_header())
    with pytest.raises(StreamError, match="PAGE_LIST section out of order"):
        plain.feed(page_list_header(0, [0], data[:4096], Checksum.CRC32)[:28])
