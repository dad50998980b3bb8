"""QEMU trace logs of virtio-mem: the events and their parser (no I/O but reading a file).

Rules:

* Input is QEMU's "log" trace backend output: ``PID@SECONDS:event_name args``. The events
  understood are the ``virtio_mem_*`` request/response/resize events,
  ``ram_block_discard_range`` and ``memory_device_(pre_)plug``; each becomes a typed,
  frozen event carrying its 1-based line number.
* Junk handling (documented choice): a line that is not a trace line at all (blank, a
  QEMU warning, a truncated line) and a trace line of an event this module does not know
  are skipped and recorded in :attr:`TraceLog.skipped` (line numbers) / counted in
  :attr:`TraceLog.ignored`. A known event whose arguments do not parse is an error: in
  the default strict mode :class:`TraceParseError` names the line; with ``strict=False``
  it is skipped like junk. Request addresses and block counts must fit their wire fields
  (64 and 16 bits) or the arguments do not parse. Nothing else is ever raised for any
  text input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ramdiscard.errors import ProtocolViolation
from ramdiscard.providers.virtio_mem.wire import BlockState, ResponseType


class TraceParseError(ProtocolViolation, ValueError):
    """A trace line of a known event could not be parsed; ``line`` is 1-based."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass(frozen=True, slots=True)
class TraceEvent:
    line: int
    pid: int
    timestamp: float


@dataclass(frozen=True, slots=True)
class PlugRequest(TraceEvent):
    addr: int
    nb_blocks: int


@dataclass(frozen=True, slots=True)
class UnplugRequest(TraceEvent):
    addr: int
    nb_blocks: int


@dataclass(frozen=True, slots=True)
class UnplugAllRequest(TraceEvent):
    pass


@dataclass(frozen=True, slots=True)
class StateRequest(TraceEvent):
    addr: int
    nb_blocks: int


@dataclass(frozen=True, slots=True)
class StateResponse(TraceEvent):
    state: BlockState


@dataclass(frozen=True, slots=True)
class SendResponse(TraceEvent):
    type: ResponseType


@dataclass(frozen=True, slots=True)
class DiscardRange(TraceEvent):
    ramblock: str
    host_address: int
    length: int
    ret: int


@dataclass(frozen=True, slots=True)
class ResizedUsableRegion(TraceEvent):
    old_size: int
    new_size: int


@dataclass(frozen=True, slots=True)
class UnpluggedAll(TraceEvent):
    pass


@dataclass(frozen=True, slots=True)
class MemoryDevicePrePlug(TraceEvent):
    id: str
    addr: int


@dataclass(frozen=True, slots=True)
class MemoryDevicePlug(TraceEvent):
    id: str
    addr: int


@dataclass
class TraceLog:
    """Parsed events plus what was skipped."""

    events: list[TraceEvent] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    """Line numbers of junk lines and (non-strict) malformed known events."""
    ignored: int = 0
    """Well-formed trace lines of events this module does not interpret."""


_LINE = re.compile(r"^(\d{1,19})@(\d+(?:\.\d+)?):([A-Za-z_][A-Za-z0-9_]*)(?:\s(.*))?$")
_HEX = r"(0x[0-9a-fA-F]+)"
_ARGS: dict[str, re.Pattern[str]] = {
    "virtio_mem_plug_request": re.compile(rf"^addr={_HEX}\s+nb_blocks=(\d+)\s*$"),
    "virtio_mem_unplug_request": re.compile(rf"^addr={_HEX}\s+nb_blocks=(\d+)\s*$"),
    "virtio_mem_state_request": re.compile(rf"^addr={_HEX}\s+nb_blocks=(\d+)\s*$"),
    "virtio_mem_unplug_all_request": re.compile(r"^\s*$"),
    "virtio_mem_unplugged_all": re.compile(r"^\s*$"),
    "virtio_mem_send_response": re.compile(r"^type=(\d+)\s*$"),
    "virtio_mem_state_response": re.compile(r"^state=(\d+)\s*$"),
    # QEMU's format string lacks a space before new_size; accept both.
    "virtio_mem_resized_usable_region": re.compile(rf"^old_size={_HEX}\s*new_size={_HEX}\s*$"),
    "ram_block_discard_range": re.compile(rf"^(\S*)@{_HEX}\s*\+\s*{_HEX}:.*?ret:\s*(-?\d+)\s*$"),
    "memory_device_pre_plug": re.compile(rf"^id=(\S*)\s+addr={_HEX}\s*$"),
    "memory_device_plug": re.compile(rf"^id=(\S*)\s+addr={_HEX}\s*$"),
}


def _field(text: str, base: int, bits: int) -> int:
    """A logged integer that must fit the wire field it came from (ValueError if not)."""
    if len(text) > 24:
        raise ValueError(f"{text[:24]}... does not fit in {bits} bits")
    value = int(text, base)
    if value >> bits:
        raise ValueError(f"{text} does not fit in {bits} bits")
    return value


def _build(name: str, m: re.Match[str], line: int, pid: int, ts: float) -> TraceEvent:
    g = m.groups()
    if name in ("virtio_mem_plug_request", "virtio_mem_unplug_request", "virtio_mem_state_request"):
        kind = {"virtio_mem_plug_request": PlugRequest, "virtio_mem_unplug_request": UnplugRequest}.get(
            name, StateRequest
        )
        return kind(line, pid, ts, _field(g[0], 16, 64), _field(g[1], 10, 16))
    if name == "virtio_mem_unplug_all_request":
        return UnplugAllRequest(line, pid, ts)
    if name == "virtio_mem_unplugged_all":
        return UnpluggedAll(line, pid, ts)
    if name == "virtio_mem_send_response":
        return SendResponse(line, pid, ts, ResponseType(int(g[0])))
    if name == "virtio_mem_state_response":
        return StateResponse(line, pid, ts, BlockState(int(g[0])))
    if name == "virtio_mem_resized_usable_region":
        return ResizedUsableRegion(line, pid, ts, int(g[0], 16), int(g[1], 16))
    if name == "ram_block_discard_range":
        return DiscardRange(line, pid, ts, g[0], int(g[1], 16), int(g[2], 16), int(g[3]))
    if name == "memory_device_pre_plug":
        return MemoryDevicePrePlug(line, pid, ts, g[0], int(g[1], 16))
    assert name == "memory_device_plug"
    return MemoryDevicePlug(line, pid, ts, g[0], int(g[1], 16))


def parse_trace(lines: Iterable[str], *, strict: bool = True) -> TraceLog:
    """Parse trace lines (see the module rules for junk handling)."""
    out = TraceLog()
    for number, raw in enumerate(lines, start=1):
        text = raw.rstrip("\r\n")
        m = _LINE.match(text)
        if m is None:
            out.skipped.append(number)
            continue
        pid, ts, name, args = int(m.group(1)), float(m.group(2)), m.group(3), m.group(4) or ""
        pattern = _ARGS.get(name)
        if pattern is None:
            out.ignored += 1
            continue
        am = pattern.match(args)
        event: TraceEvent | None = None
        error = f"malformed {name} arguments: {args!r}"
        if am is not None:
            try:
                event = _build(name, am, number, pid, ts)
            except ValueError as exc:
                error = f"{name}: {exc}"
        if event is None:
            if strict:
                raise TraceParseError(number, error)
            out.skipped.append(number)
            continue
        out.events.append(event)
    return out


def parse_trace_file(path: str | Path, *, strict: bool = True) -> TraceLog:
    with open(path, encoding="utf-8", errors="replace") as f:
        return parse_trace(f, strict=strict)
