"""JSON message framing for QMP: a byte stream cut into messages, as a pure state machine.

Rules (QEMU's qobject/json-streamer.c, json-lexer.c):

* Input is a stream of JSON values with no delimiter; a message ends where its top-level
  value ends (QEMU counts braces and brackets; so does :class:`JsonFramer`). A message is
  at most ``max_message`` bytes and ``max_nesting`` levels deep.
* Bad input never raises: every malformed message becomes exactly one error reply of
  class GenericError with QEMU's description ("JSON parse error, ...", "JSON token size
  limit exceeded", "QMP input must be a JSON object", "QMP input lacks member
  'execute'", ...). Replies to parse errors carry no "id"; replies to objects that had an
  "id" mirror it.
* After a lexical error (a byte no JSON token can start with, a control byte, a raw
  non-ASCII byte outside a string) the framer skips input until a resynchronisation
  point: ``{``, ``[``, a newline, or the bytes 0xFE/0xFF (which clients may send on
  purpose to reset the parser; at top level they are silent). The rest of an oversized or
  too deeply nested message is skipped silently (its structure is still tracked), so one
  bad message gives one error.

Theory of operation: :class:`JsonFramer` is a byte-at-a-time scanner that only tracks
what is needed to find message boundaries: the nesting depth, whether it is inside a
string, and whether the previous byte was a backslash. Complete messages are decoded as
strict UTF-8 and parsed with :mod:`json` (NaN/Infinity refused, and so is a number too
large for a double, such as ``1e999``: the whole message is a parse error, so no reply
ever carries a non-JSON value). The framer's output for a stream does not depend on how
the stream is cut into chunks.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from typing import Any, Final

MiB: Final = 1 << 20
DEFAULT_MAX_MESSAGE: Final = 1 * MiB
"""Largest accepted message (QEMU allows 64 MiB of tokens; a control plane needs far less)."""
DEFAULT_MAX_NESTING: Final = 128
"""Deepest accepted nesting (QEMU: 1024; ours stays well inside Python's recursion limit)."""


@dataclass(frozen=True)
class Message:
    """A complete JSON value read from the stream (already parsed)."""

    value: Any


@dataclass(frozen=True)
class BadMessage:
    """Input that is not a JSON value, or exceeds a limit; ``desc`` is QEMU's text."""

    desc: str


class _State(enum.Enum):
    IDLE = enum.auto()
    VALUE = enum.auto()  # inside an object or array
    SCALAR = enum.auto()  # a bare top-level token: number or keyword
    STRING = enum.auto()  # a top-level string
    RECOVER = enum.auto()  # skipping after a lexical error
    DISCARD = enum.auto()  # skipping the rest of a message over a limit


_WHITESPACE: Final = frozenset(b" \t\r\n")
_SCALAR_BYTES: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.")
_RESET: Final = frozenset((0xFE, 0xFF))
_STRUCT_NO_VALUE: Final = frozenset(b"}]:,")


def _stray(byte: int) -> str:
    ch = chr(byte)
    text = ch if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"
    return f"JSON parse error, stray '{text}'"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number '{text[:32]}' out of range")
    return value


def parse_json(raw: bytes) -> Message | BadMessage:
    """Parse one complete JSON text the way QEMU's parser would accept it."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return BadMessage("JSON parse error, invalid UTF-8 sequence in string")
    try:
        return Message(json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float))
    except json.JSONDecodeError as exc:
        msg = exc.msg[:1].lower() + exc.msg[1:]
        return BadMessage(f"JSON parse error, {msg} (line {exc.lineno} column {exc.colno})")
    except ValueError as exc:
        return BadMessage(f"JSON parse error, {exc}")
    except RecursionError:
        return BadMessage("JSON nesting depth limit exceeded")


class JsonFramer:
    """Splits a byte stream into JSON values; see the module rules.

    ``feed(data)`` returns the values and errors completed by ``data``, in stream order.
    It never raises for any input and keeps at most ``max_message`` bytes buffered.
    """

    def __init__(
        self, max_message: int = DEFAULT_MAX_MESSAGE, max_nesting: int = DEFAULT_MAX_NESTING
    ) -> None:
        if max_message < 2 or max_nesting < 1:
            raise ValueError("max_message must be at least 2 and max_nesting at least 1")
        self.max_message = max_message
        self.max_nesting = max_nesting
        self._state = _State.IDLE
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False

    @property
    def buffered(self) -> int:
        """Bytes held for the message in progress."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """True between messages (nothing partial held, not skipping)."""
        return self._state is _State.IDLE

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message | BadMessage]:
        out: list[Message | BadMessage] = []
        for byte in bytes(data):
            self._step(byte, out)
        return out

    def _reset(self, state: _State = _State.IDLE) -> None:
        self._state = state
        self._buf.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False

    def _lexical_error(self, byte: int, out: list[Message | BadMessage]) -> None:
        out.append(BadMessage(_stray(byte)))
        # A newline or reset byte is itself the resynchronisation point.
        self._reset(_State.IDLE if byte == 0x0A or byte in _RESET else _State.RECOVER)

    def _append(self, byte: int, out: list[Message | BadMessage]) -> bool:
        """Buffer ``byte``; False (and the message abandoned) when over the size limit."""
        if len(self._buf) >= self.max_message:
            out.append(BadMessage("JSON token size limit exceeded"))
            self._buf.clear()
            return False
        self._buf.append(byte)
        return True

    def _step(self, byte: int, out: list[Message | BadMessage]) -> None:
        state = self._state
        if state is _State.IDLE:
            self._start(byte, out)
        elif state is _State.VALUE:
            self._value_byte(byte, out)
        elif state is _State.SCALAR:
            if byte in _SCALAR_BYTES:
                if not self._append(byte, out):
                    self._reset(_State.RECOVER)
                return
            self._finish_scalar(out)
            self._start(byte, out)
        elif state is _State.STRING:
            self._string_byte(byte, out)
        elif state is _State.RECOVER:
            if byte in _RESET or byte == 0x0A:
                self._reset()
            elif byte in (0x7B, 0x5B):  # { [
                self._reset()
                self._start(byte, out)
        else:  # DISCARD
            self._discard_byte(byte)

    def _start(self, byte: int, out: list[Message | BadMessage]) -> None:
        if byte in _WHITESPACE or byte in _RESET:
            return
        if byte in (0x7B, 0x5B):  # { [
            self._reset(_State.VALUE)
            self._buf.append(byte)
            self._depth = 1
        elif byte == 0x22:  # "
            self._reset(_State.STRING)
            self._buf.append(byte)
        elif byte in _SCALAR_BYTES:
            self._reset(_State.SCALAR)
            self._buf.append(byte)
        elif byte in _STRUCT_NO_VALUE:
            out.append(BadMessage("JSON parse error, expecting value"))
            self._reset(_State.RECOVER)
        else:
            self._lexical_error(byte, out)

    def _value_byte(self, byte: int, out: list[Message | BadMessage]) -> None:
        if byte in _RESET:
            self._lexical_error(byte, out)
            return
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:  # backslash
                self._escape = True
            elif byte == 0x22:
                self._in_string = False
            elif byte < 0x20:
                self._lexical_error(byte, out)
                return
        else:
            if byte == 0x22:
                self._in_string = True
            elif byte in (0x7B, 0x5B):
                self._depth += 1
                if self._depth > self.max_nesting:
                    out.append(BadMessage("JSON nesting depth limit exceeded"))
                    self._buf.clear()
                    self._state = _State.DISCARD
                    return
            elif byte in (0x7D, 0x5D):  # } ]
                self._depth -= 1
            elif (byte < 0x20 and byte not in _WHITESPACE) or byte >= 0x80:
                self._lexical_error(byte, out)
                return
        if not self._append(byte, out):
            self._state = _State.DISCARD
            return
        if self._depth == 0:
            raw = bytes(self._buf)
            self._reset()
            out.append(parse_json(raw))

    def _string_byte(self, byte: int, out: list[Message | BadMessage]) -> None:
        if byte in _RESET or (byte < 0x20 and not self._escape):
            self._lexical_error(byte, out)
            return
        if not self._append(byte, out):
            self._reset(_State.RECOVER)
            return
        if self._escape:
            self._escape = False
        elif byte == 0x5C:
            self._escape = True
        elif byte == 0x22:
            raw = bytes(self._buf)
            self._reset()
            out.append(parse_json(raw))

    def _finish_scalar(self, out: list[Message | BadMessage]) -> None:
        raw = bytes(self._buf)
        self._reset()
        result = parse_json(raw)
        if isinstance(result, BadMessage):
            token = raw.decode("ascii")
            kind = "invalid keyword" if token.isalpha() else "invalid token"
            result = BadMessage(f"JSON parse error, {kind} '{token}'")
        out.append(result)

    def _discard_byte(self, byte: int) -> None:
        if byte in _RESET:
            self._reset()
            return
        if self._in_string:
            if self._escape:
                self._escape = False
            elif byte == 0x5C:
                self._escape = True
            elif byte == 0x22:
                self._in_string = False
            return
        if byte == 0x22:
            self._in_string = True
        elif byte in (0x7B, 0x5B):
            self._depth += 1
        elif byte in (0x7D, 0x5D):
            self._depth -= 1
            if self._depth <= 0:
                self._reset()
