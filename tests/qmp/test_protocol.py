"""The sans-I/O QMP protocol: framing, parse errors, request checks, negotiation."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ramdiscard.qmp.protocol import (
    NO_ID,
    BadMessage,
    Execute,
    Item,
    JsonFramer,
    Message,
    QmpConnection,
    Reply,
    replies,
)

VERSION = {"qemu": {"micro": 0, "minor": 1, "major": 10}, "package": "ramdiscard test"}


def negotiated(**kw: Any) -> QmpConnection:
    conn = QmpConnection(VERSION, **kw)
    conn.greeting()
    assert replies(conn.receive_data(b'{"execute": "qmp_capabilities"}')) == [{"return": {}}]
    return conn


def err(desc: str, cls: str = "GenericError", **extra: Any) -> dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}, **extra}


# -- greeting and negotiation -------------------------------------------------------------


def test_greeting_is_qemu_shaped_and_crlf_terminated() -> None:
    conn = QmpConnection(VERSION)
    data = conn.greeting()
    assert data.endswith(b"\r\n")
    assert json.loads(data) == {"QMP": {"version": VERSION, "capabilities": []}}


def test_commands_before_negotiation_are_command_not_found() -> None:
    conn = QmpConnection(VERSION)
    conn.greeting()
    for cmd in (b'{"execute": "query-version", "id": 1}', b'{"execute": "no-such", "id": 1}'):
        assert replies(conn.receive_data(cmd)) == [
            err("Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound", id=1)
        ]
    assert not conn.negotiated
    assert conn.event_bytes({"event": "X"}) is None


def test_negotiation_then_second_negotiation_is_refused() -> None:
    conn = negotiated()
    assert conn.negotiated
    assert conn.event_bytes({"event": "X"}) == b'{"event": "X"}\r\n'
    out = conn.receive_data(b'{"execute": "qmp_capabilities", "id": "x"}')
    assert replies(out) == [
        err("Capabilities negotiation is already complete, command ignored", "CommandNotFound", id="x")
    ]
    items = conn.receive_data(b'{"execute": "query-version", "arguments": {"a": 1}, "id": [1]}')
    assert items == [Execute("query-version", {"a": 1}, [1])]


def test_capability_arguments_are_checked() -> None:
    conn = QmpConnection(VERSION)
    cases = {
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}': (
            "Capability 'oob' not available"
        ),
        b'{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}': (
            "Parameter 'enable[0]' does not accept value 'x'"
        ),
        b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}': (
            "Invalid parameter type for 'enable', expected: array"
        ),
        b'{"execute": "qmp_capabilities", "arguments": {"foo": 1}}': "Parameter 'foo' is unexpected",
    }
    for data, desc in cases.items():
        assert replies(conn.receive_data(data)) == [err(desc)]
    assert not conn.negotiated
    assert replies(conn.receive_data(b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}')) == [
        {"return": {}}
    ]


def test_replies_mirror_the_id() -> None:
    conn = negotiated()
    (req,) = conn.receive_data(b'{"execute": "quit", "id": null}')
    assert isinstance(req, Execute) and req.id is None
    assert json.loads(conn.return_bytes(req, {})) == {"return": {}, "id": None}
    (req,) = conn.receive_data(b'{"execute": "quit"}')
    assert isinstance(req, Execute) and req.id is NO_ID
    assert json.loads(conn.return_bytes(req, [1])) == {"return": [1]}


# -- request shape ----------------------------------------------------------------------------


def test_request_shape_errors_use_qemu_messages() -> None:
    conn = negotiated()
    cases = {
        b"[1, 2]": err("QMP input must be a JSON object"),
        b'"str"': err("QMP input must be a JSON object"),
        b"123 ": err("QMP input must be a JSON object"),
        b'{"arguments": {}, "id": 7}': err("QMP input lacks member 'execute'", id=7),
        b'{"execute": 1, "id": 7}': err("QMP input member 'execute' must be a string", id=7),
        b'{"execute": "x", "arguments": [], "id": 7}': err(
            "QMP input member 'arguments' must be an object", id=7
        ),
        b'{"execute": "x", "foo": 1}': err("QMP input member 'foo' is unexpected"),
        b'{"exec-oob": "x"}': err("QMP input member 'exec-oob' is unexpected"),
    }
    for data, expected in cases.items():
        assert replies(conn.receive_data(data)) == [expected], data


def test_parse_errors_have_qemu_prefix_and_no_id() -> None:
    conn = negotiated()
    (reply,) = replies(conn.receive_data(b'{"execute": "x", "id": 1,}'))
    assert reply["error"]["class"] == "GenericError"
    assert reply["error"]["desc"].startswith("JSON parse error, ")
    assert "id" not in reply
    assert replies(conn.receive_data(b"foo ")) == [err("JSON parse error, invalid keyword 'foo'")]
    assert replies(conn.receive_data(b"NaN ")) == [err("JSON parse error, invalid keyword 'NaN'")]
    assert replies(conn.receive_data(b'{"a": NaN}')) == [err("JSON parse error, invalid keyword 'NaN'")]
    assert replies(conn.receive_data(b"}")) == [err("JSON parse error, expecting value")]


# -- framing ------------------------------------------------------------------------------------


def values(framer: JsonFramer, data: bytes) -> list[Any]:
    out = framer.feed(data)
    assert all(isinstance(m, Message) for m in out), out
    return [m.value for m in out if isinstance(m, Message)]


def test_messages_need_no_delimiter_and_strings_may_hold_brackets() -> None:
    f = JsonFramer()
    data = b'{"a":1}{"b":[2,{"c":"}]{["}]}  {"d":"\\"}"}\n[]'
    assert values(f, data) == [{"a": 1}, {"b": [2, {"c": "}]{["}]}, {"d": '"}'}, []]
    assert f.idle and f.buffered == 0


def test_scalar_ends_only_at_a_delimiter() -> None:
    f = JsonFramer()
    assert f.feed(b"12") == []
    assert f.feed(b"34") == []
    assert values(f, b" ") == [1234]


def test_oversized_message_gives_one_error_and_the_next_message_works() -> None:
    f = JsonFramer(max_message=64)
    big = b'{"execute": "x", "arguments": {"s": "' + b"}{" * 500 + b'", "t": [[[]]]}}'
    out = f.feed(big + b'{"execute": "ok"}')
    assert out == [BadMessage("JSON token size limit exceeded"), Message({"execute": "ok"})]
    assert f.idle


def test_nesting_limit() -> None:
    f = JsonFramer(max_nesting=4)
    out = f.feed(b"[[[[[[[[1]]]]]]]]" + b"[[1]]")
    assert out == [BadMessage("JSON nesting depth limit exceeded"), Message([[1]])]


def test_stray_bytes_recover_at_the_next_message() -> None:
    f = JsonFramer()
    assert f.feed(b"@@@ junk }} 12 ") == [BadMessage("JSON parse error, stray '@'")]
    assert values(f, b'{"execute": "a"}') == [{"execute": "a"}]
    assert f.feed(b"\x01 junk\n42 ") == [BadMessage("JSON parse error, stray '\\x01'"), Message(42)]


def test_control_byte_inside_a_message_abandons_it() -> None:
    f = JsonFramer()
    out = f.feed(b'{"execute": "qu\x00it"}{"execute": "b"}')
    assert out[0] == BadMessage("JSON parse error, stray '\\x00'")
    assert out[-1] == Message({"execute": "b"})


def test_reset_byte_drops_a_partial_message() -> None:
    f = JsonFramer()
    assert f.feed(b'{"execute": "qu') == []
    out = f.feed(b'\xff{"execute": "b"}')
    assert out == [BadMessage("JSON parse error, stray '\\xff'"), Message({"execute": "b"})]
    assert f.feed(b"\xff\xfe\xff") == []  # silent between messages


def test_invalid_utf8_in_a_string() -> None:
    f = JsonFramer()
    assert f.feed(b'{"execute": "\xc3\x28"}') == [
        BadMessage("JSON parse error, invalid UTF-8 sequence in string")
    ]
    assert values(f, '{"execute": "h\u00e9"}'.encode()) == [{"execute": "h\u00e9"}]


# -- properties -----------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
commands = st.builds(
    lambda name, args, rid: {"execute": name, "arguments": args, **({"id": rid} if rid is not None else {})},
    st.sampled_from(["query-version", "qom-get", "x}{", 'q"uit']),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    json_scalars,
)
junk = st.sampled_from([b"@", b"}", b"]", b"\x00", b"\x80", b"foo ", b"12 ", b'"s"', b"{,}", b"[1,]", b"\n"])


def feed_chunked(conn: QmpConnection, data: bytes, cuts: list[int]) -> list[Item]:
    out: list[Item] = []
    prev = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        out += conn.receive_data(data[prev:cut])
        prev = cut
    return out


@given(st.lists(st.one_of(commands.map(lambda c: json.dumps(c).encode()), junk), max_size=12), st.data())
def test_chunking_does_not_change_the_result(parts: list[bytes], data: st.DataObject) -> None:
    stream = b" ".join(parts) + b" "
    whole = negotiated().receive_data(stream)
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=20))
    assert feed_chunked(negotiated(), stream, cuts) == whole
    byte_by_byte = negotiated()
    assert [item for b in stream for item in byte_by_byte.receive_data(bytes([b]))] == whole


@given(st.lists(commands, min_size=1, max_size=6))
def test_valid_commands_come_out_as_sent(cmds: list[dict[str, Any]]) -> None:
    conn = negotiated()
    items = conn.receive_data(b"".join(json.dumps(c).encode() for c in cmds))
    assert items == [Execute(c["execute"], c["arguments"], c.get("id", NO_ID)) for c in cmds]


@given(st.binary(max_size=400))
def test_random_bytes_only_ever_produce_error_replies(data: bytes) -> None:
    conn = negotiated(max_message=128, max_nesting=8)
    items = conn.receive_data(data)
    for item in items:
        if isinstance(item, Reply):
            assert set(item.message) <= {"error", "id"}
            assert item.message["error"]["class"] in ("GenericError", "CommandNotFound")
    assert conn.framer.buffered <= 128


@given(st.binary(max_size=300), commands)
def test_a_reset_byte_after_any_junk_lets_the_next_command_through(data: bytes, cmd: dict[str, Any]) -> None:
    conn = negotiated()
    conn.receive_data(data)
    items = conn.receive_data(b"\xff" + json.dumps(cmd).encode())
    assert items[-1] == Execute(cmd["execute"], cmd["arguments"], cmd.get("id", NO_ID))
