"""QMP wire protocol for one connection, as a pure state machine over bytes (no I/O).

Rules (QEMU's monitor/qmp.c, qobject/json-streamer.c, qapi/qmp-dispatch.c):

* The server speaks first: :meth:`QmpConnection.greeting` is
  ``{"QMP": {"version": ..., "capabilities": []}}``. Until the client runs
  ``qmp_capabilities`` every other command, known or not, fails with CommandNotFound
  "Expecting capabilities negotiation with 'qmp_capabilities'"; afterwards a second
  ``qmp_capabilities`` fails with CommandNotFound "Capabilities negotiation is already
  complete, command ignored". Events reach a connection only once it is negotiated.
* Input is a stream of JSON values with no delimiter, cut into messages by
  :class:`~ramdiscard.qmp.framing.JsonFramer` (limits, parse errors and resynchronisation:
  :mod:`ramdiscard.qmp.framing`).
* Bad input never raises: every malformed message becomes exactly one error reply of
  class GenericError with QEMU's description ("JSON parse error, ...", "QMP input must be
  a JSON object", "QMP input lacks member 'execute'", ...). Replies to parse errors carry
  no "id"; replies to objects that had an "id" mirror it.
* Responses and events are JSON terminated by CRLF, as QEMU's monitor writes them.

Theory of operation: :class:`QmpConnection`
adds QEMU's request-shape checks and the negotiation state on top, answering what the
protocol itself can answer (errors, ``qmp_capabilities``) and handing every other
well-formed command out as an :class:`Execute`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from ramdiscard.errors import ProtocolViolation
from ramdiscard.qmp.framing import DEFAULT_MAX_MESSAGE, DEFAULT_MAX_NESTING, BadMessage, JsonFramer, Message

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "DEFAULT_MAX_NESTING",
    "EOL",
    "NO_ID",
    "BadMessage",
    "ErrorClass",
    "Execute",
    "Item",
    "JsonFramer",
    "Message",
    "QmpConnection",
    "QmpError",
    "Reply",
    "check_request",
    "encode",
    "replies",
]

EOL: Final = b"\r\n"


class ErrorClass(enum.Enum):
    """QMP error classes (QAPI QapiErrorClass)."""

    GenericError = "GenericError"
    CommandNotFound = "CommandNotFound"
    DeviceNotActive = "DeviceNotActive"
    DeviceNotFound = "DeviceNotFound"
    KVMMissingCap = "KVMMissingCap"


class QmpError(ProtocolViolation):
    """A command failed; becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GenericError) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_json(self) -> dict[str, str]:
        return {"class": self.error_class.value, "desc": self.desc}


class _NoId:
    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Final[Any] = _NoId()
"""Marks a request without an "id" member (an explicit ``"id": null`` is an id)."""


def encode(message: dict[str, Any]) -> bytes:
    """One QMP message as the monitor writes it: strict JSON (never NaN or Infinity:
    ValueError), then CRLF."""
    return json.dumps(message, allow_nan=False).encode("ascii") + EOL


# -- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Execute:
    """A well-formed command for the dispatcher (connection negotiated)."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: Any = NO_ID


@dataclass(frozen=True)
class Reply:
    """Bytes the protocol produced by itself (an error, or qmp_capabilities' answer)."""

    data: bytes

    @property
    def message(self) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.data)
        return value


Item = Execute | Reply


def check_request(value: Any) -> Execute | QmpError:
    """QEMU's request-shape checks (qmp_dispatch_check_obj, no out-of-band support)."""
    if not isinstance(value, dict):
        return QmpError("QMP input must be a JSON object")
    for key, member in value.items():
        if key == "execute":
            if not isinstance(member, str):
                return QmpError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(member, dict):
                return QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            return QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in value:
        return QmpError("QMP input lacks member 'execute'")
    return Execute(value["execute"], dict(value.get("arguments", {})), value.get("id", NO_ID))


class QmpConnection:
    """One client connection's protocol state; see the module rules.

    ``version`` is the ``query-version`` answer placed in the greeting.
    """

    def __init__(
        self,
        version: dict[str, Any],
        *,
        max_message: int = DEFAULT_MAX_MESSAGE,
        max_nesting: int = DEFAULT_MAX_NESTING,
    ) -> None:
        self._version = version
        self._framer = JsonFramer(max_message, max_nesting)
        self._negotiated = False
        self._greeted = False

    @property
    def negotiated(self) -> bool:
        return self._negotiated

    @property
    def framer(self) -> JsonFramer:
        return self._framer

    def greeting(self) -> bytes:
        """The greeting; the first thing sent on a connection (once)."""
        if self._greeted:
            raise RuntimeError("the greeting was already sent on this connection")
        self._greeted = True
        return encode({"QMP": {"version": self._version, "capabilities": []}})

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Item]:
        """Feed bytes from the client; returns what to execute or send, in order."""
        items: list[Item] = []
        for result in self._framer.feed(data):
            if isinstance(result, BadMessage):
                items.append(Reply(encode({"error": QmpError(result.desc).to_json()})))
                continue
            req = check_request(result.value)
            if isinstance(req, QmpError):
                rid = result.value.get("id", NO_ID) if isinstance(result.value, dict) else NO_ID
                items.append(Reply(self._error_bytes(rid, req)))
            else:
                items.append(self._gate(req))
        return items

    def _gate(self, req: Execute) -> Item:
        if req.name == "qmp_capabilities":
            if self._negotiated:
                return Reply(
                    self._error_bytes(
                        req.id,
                        QmpError(
                            "Capabilities negotiation is already complete, command ignored",
                            ErrorClass.CommandNotFound,
                        ),
                    )
                )
            err = _check_capabilities_args(req.arguments)
            if err is not None:
                return Reply(self._error_bytes(req.id, err))
            self._negotiated = True
            return Reply(self.return_bytes(req, {}))
        if not self._negotiated:
            return Reply(
                self._error_bytes(
                    req.id,
                    QmpError(
                        "Expecting capabilities negotiation with 'qmp_capabilities'",
                        ErrorClass.CommandNotFound,
                    ),
                )
            )
        return req

    def return_bytes(self, req: Execute, value: Any) -> bytes:
        """The success reply to ``req``."""
        msg: dict[str, Any] = {"return": value}
        if req.id is not NO_ID:
            msg["id"] = req.id
        return encode(msg)

    def error_bytes(self, req: Execute, error: QmpError) -> bytes:
        """The error reply to ``req``."""
        return self._error_bytes(req.id, error)

    @staticmethod
    def _error_bytes(rid: Any, error: QmpError) -> bytes:
        msg: dict[str, Any] = {"error": error.to_json()}
        if rid is not NO_ID:
            msg["id"] = rid
        return encode(msg)

    def event_bytes(self, event: dict[str, Any]) -> bytes | None:
        """An event for this connection, or None while it is not negotiated."""
        return encode(event) if self._negotiated else None


def _check_capabilities_args(arguments: dict[str, Any]) -> QmpError | None:
    for key in arguments:
        if key != "enable":
            return QmpError(f"Parameter '{key}' is unexpected")
    enable = arguments.get("enable", [])
    if not isinstance(enable, list):
        return QmpError("Invalid parameter type for 'enable', expected: array")
    for i, cap in enumerate(enable):
        if not isinstance(cap, str):
            return QmpError(f"Invalid parameter type for 'enable[{i}]', expected: string")
        if cap != "oob":
            return QmpError(f"Parameter 'enable[{i}]' does not accept value '{cap}'")
        return QmpError(f"Capability '{cap}' not available")
    return None


def replies(items: Iterable[Item]) -> list[dict[str, Any]]:
    """The decoded protocol replies among ``items`` (a test and debugging helper)."""
    return [item.message for item in items if isinstance(item, Reply)]
