"""QEMU trace logs of virtio-mem: replaying them against a device.

Rules:

* Parsing (the events, junk handling, what is an error) is :mod:`ramdiscard.replay.events`;
  its names are re-exported here.
* :func:`replay_trace` feeds every logged request through a fresh device's
  :meth:`~ramdiscard.providers.virtio_mem.device.VirtioMem.handle_request`, in order, and compares
  the responses, plugged sizes, usable-region sizes and host discards with the log. A
  log that asks for something the device refuses (an inferred requested size it cannot
  take) yields a mismatch, never an exception.

Theory of operation for the replay: the log does not record ``requested-size`` writes,
only what QEMU's usable-region rule (0 for 0, else requested + extent rounded up to
blocks, capped at the region) makes of them. The replay therefore infers requested-size
from every event that implies it and sets it on the device before the event's effect:

* ``virtio_mem_resized_usable_region`` at realize and after a write (QEMU logs a write
  only when the usable region does not shrink) gives the requested size exactly below
  the region size, and a range of them at the region size (the current value is kept
  when it is in range, else the nearest end is taken);
* the resize logged right after ``virtio_mem_unplugged_all`` (a guest UNPLUG_ALL or a
  system reset, where QEMU may shrink the region) is adopted *before* the unplug-all is
  replayed, so the device shrinks exactly as QEMU did;
* a plug is the only request whose answer depends on requested-size: a logged ACK
  raises it to at least plugged + request (never so far that the usable region would
  grow without a logged resize), a logged NACK lowers it below that.

So a mismatch means the device itself answered or sized differently, never that the
replay guessed requested-size wrong. ``virtio_mem_unplugged_all`` without a preceding
UNPLUG_ALL request is a system reset. Host addresses differ between runs, so logged
discards are compared as (offset, length) with offsets relative to the first logged
discard, which is the realize-time discard of the whole block. QEMU before 8.0 discarded
the whole block in every unplug-all even with nothing plugged; upstream (and this device)
skip that. Such logged discards are reported in :attr:`ReplayReport.skipped_discards`, not
as mismatches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ramdiscard.errors import InvalidArgument
from ramdiscard.providers.virtio_mem.wire import Request, RequestType, Response, ResponseType
from ramdiscard.replay.events import (
    DiscardRange,
    PlugRequest,
    ResizedUsableRegion,
    SendResponse,
    StateRequest,
    TraceEvent,
    TraceLog,
    UnplugAllRequest,
    UnpluggedAll,
    UnplugRequest,
)
from ramdiscard.units import align_down, align_up

if TYPE_CHECKING:
    from ramdiscard.providers.virtio_mem.device import VirtioMem


@dataclass(frozen=True, slots=True)
class Mismatch:
    line: int
    what: str
    logged: object
    replayed: object


@dataclass(frozen=True, slots=True)
class ReplayPoint:
    """The device (and what ``probe`` measured) right after one replayed event."""

    index: int
    """Requests replayed so far (this one included for a request)."""
    line: int
    timestamp: float
    """The logged event's timestamp (seconds)."""
    kind: str
    """"request", "resize" (a logged usable-region resize) or "reset" (system reset)."""
    requested: int
    plugged: int
    usable_region: int
    extra: Mapping[str, int | None] = field(default_factory=dict)
    """What the ``probe`` of :func:`replay_trace` returned at that point."""


@dataclass
class ReplayReport:
    """What :func:`replay_trace` found. ``ok`` means no mismatch of any kind."""

    requests: int = 0
    responses: dict[str, int] = field(default_factory=dict)
    mismatches: list[Mismatch] = field(default_factory=list)
    plugged_sizes: list[int] = field(default_factory=list)
    """Device plugged size after each request."""
    usable_region_sizes: list[int] = field(default_factory=list)
    """Device usable-region size after each logged resize."""
    logged_discards: list[tuple[int, int]] = field(default_factory=list)
    """Logged (offset from the first discard, length), minus skipped ones."""
    device_discards: list[tuple[int, int]] = field(default_factory=list)
    skipped_discards: list[tuple[int, str]] = field(default_factory=list)
    """(line, reason) of logged discards not expected from this device."""
    requested_size_writes: list[int] = field(default_factory=list)
    """Requested sizes the replay set on the device, in order (see the module docstring)."""
    requested_size_inferred: list[tuple[int, int]] = field(default_factory=list)
    """(line, requested size) of each of those writes: the event that implied it."""
    timeline: list[ReplayPoint] = field(default_factory=list)
    """One point per replayed request, logged resize and system reset, in log order."""

    @property
    def ok(self) -> bool:
        return not self.mismatches


def replay_trace(
    events: Iterable[TraceEvent] | TraceLog,
    device: VirtioMem,
    *,
    probe: Callable[[], Mapping[str, int | None]] | None = None,
) -> ReplayReport:
    """Replay logged requests against ``device`` (freshly realized, same geometry as the
    logged one) and compare the outcome with the log; see the module docstring.
    ``probe`` (if given) is called after each event that adds a point to
    :attr:`ReplayReport.timeline` (e.g. a consumer's pinned bytes); what it raises
    propagates."""
    if isinstance(events, TraceLog):
        events = events.events
    evs = list(events)
    report = ReplayReport()
    recorded: list[tuple[int, int]] = []
    if device.realize_discarded:
        recorded.append((0, device.ram.size))

    def hook(offset: int, length: int) -> None:
        recorded.append((offset, length))

    device.add_host_discard_hook(hook)
    try:
        _replay(evs, device, report, probe)
    finally:
        device.remove_host_discard_hook(hook)
    report.device_discards = recorded
    if report.logged_discards != recorded:
        report.mismatches.append(Mismatch(0, "host discards", report.logged_discards, recorded))
    return report


def usable_region_for(device: VirtioMem, requested: int) -> int:
    """The usable-region size QEMU's sizing rule gives ``requested`` on ``device``'s
    geometry: 0 for 0, else requested + extent rounded up to blocks, capped at the region."""
    if requested == 0:
        return 0
    return min(device.region_size, align_up(requested + device.usable_extent, device.block_size))


def requested_sizes_for(device: VirtioMem, usable: int) -> tuple[int, int] | None:
    """The inclusive range of requested sizes (block multiples, at most the region) whose
    usable region on ``device``'s geometry is exactly ``usable``; None if there is none.

    Below the region size the answer is a single value; a usable region equal to the
    region size is given by every requested size from the smallest that reaches it up to
    the region size (the log cannot tell them apart)."""
    bs, region = device.block_size, device.region_size
    if usable == 0:
        return (0, 0)
    if usable < region:
        low = align_down(usable - device.usable_extent, bs) if usable > device.usable_extent else 0
        high = low
    else:
        below = region - bs - device.usable_extent
        low = bs if below < 0 else align_down(below, bs) + bs
        high = region
    if low <= 0 or low > high or usable_region_for(device, low) != usable:
        return None
    return (low, high)


class _Replayer:
    """One pass over the events; see the module docstring for the inference rules."""

    def __init__(
        self,
        evs: list[TraceEvent],
        device: VirtioMem,
        report: ReplayReport,
        probe: Callable[[], Mapping[str, int | None]] | None = None,
    ) -> None:
        self.evs = evs
        self.probe = probe
        self.device = device
        self.report = report
        self.base: int | None = None
        self.pending: list[tuple[TraceEvent, Response, RequestType]] = []
        self.in_unplug_all = False
        self.discards: list[DiscardRange] = []
        self.expected_plugged = 0
        self.plugged_before_unplug_all = 0

    def run(self) -> None:
        for i, ev in enumerate(self.evs):
            if isinstance(ev, DiscardRange):
                if self.base is None:
                    self.base = ev.host_address
                self.discards.append(ev)
            elif isinstance(ev, PlugRequest | UnplugRequest | StateRequest | UnplugAllRequest):
                self._request(i, ev)
            elif isinstance(ev, SendResponse):
                self._response(ev)
            elif isinstance(ev, UnpluggedAll):
                self._unplugged_all(i)
            elif isinstance(ev, ResizedUsableRegion):
                self._resized(i, ev)
        self._flush(None)
        for req_ev, resp, _ in self.pending:
            self.report.mismatches.append(
                Mismatch(req_ev.line, "request without logged response", None, resp.type)
            )

    # -- requested-size inference ------------------------------------------------------

    def _set_requested(self, line: int, value: int) -> None:
        try:
            self.device.requested_size = value
        except InvalidArgument as exc:
            # Not a size this device could have been asked for: the log is not of this
            # geometry (or is damaged). Report it, keep replaying.
            self.report.mismatches.append(Mismatch(line, "requested size", value, str(exc)))
        else:
            self.report.requested_size_writes.append(value)
            self.report.requested_size_inferred.append((line, value))

    def _adopt_usable(self, ev: ResizedUsableRegion) -> None:
        """Make the device's requested size one that QEMU's usable-region rule turns into
        the logged ``new_size``, keeping the current one when it already does."""
        span = requested_sizes_for(self.device, ev.new_size)
        if span is None:
            self.report.mismatches.append(
                Mismatch(ev.line, "requested size", ev.new_size, "no requested size gives this usable region")
            )
            return
        current = self.device.requested_size
        value = min(max(current, span[0]), span[1])
        if value != current:
            self._set_requested(ev.line, value)

    def _post_unplug_all_resize(self, i: int) -> ResizedUsableRegion | None:
        """The resize logged right after the unplug-all that starts at or after index i
        (QEMU sizes the usable region from requested-size there, shrinking included)."""
        for j in range(i, len(self.evs)):
            ev = self.evs[j]
            if isinstance(ev, UnpluggedAll):
                nxt = self.evs[j + 1] if j + 1 < len(self.evs) else None
                return nxt if isinstance(nxt, ResizedUsableRegion) else None
            if j > i and not isinstance(ev, DiscardRange):
                return None
        return None

    def _adopt_plug_answer(self, i: int, ev: PlugRequest) -> None:
        """A plug is the only request whose answer depends on requested-size (ACK when the
        plugged size stays within it, NACK beyond). Writes that left the usable region
        alone are not logged, so the logged answer is evidence: adopt the closest
        requested size that yields it, unless that would grow the usable region (QEMU
        would have logged that growth, so the log really disagrees)."""
        logged: ResponseType | None = None
        for later in self.evs[i + 1 :]:
            if isinstance(later, SendResponse):
                logged = later.type
                break
            if isinstance(later, PlugRequest | UnplugRequest | StateRequest | UnplugAllRequest):
                break
        if logged is None:
            return
        dev = self.device
        size = ev.nb_blocks * dev.block_size
        offset = ev.addr - dev.addr
        if size == 0 or offset < 0 or offset % dev.block_size or offset + size > dev.usable_region_size:
            return  # the range is refused before requested-size is looked at
        need = dev.plugged_size + size
        if logged is ResponseType.ACK and need > dev.requested_size:
            if need <= dev.region_size and usable_region_for(dev, need) <= dev.usable_region_size:
                self._set_requested(ev.line, need)
        elif logged is ResponseType.NACK and need <= dev.requested_size:
            self._set_requested(ev.line, need - dev.block_size)

    # -- events --------------------------------------------------------------------------

    def _request(self, i: int, ev: PlugRequest | UnplugRequest | StateRequest | UnplugAllRequest) -> None:
        dev, report = self.device, self.report
        self._flush(None)
        if isinstance(ev, UnplugAllRequest):
            resize = self._post_unplug_all_resize(i)
            if resize is not None:
                self._adopt_usable(resize)
            req = Request(RequestType.UNPLUG_ALL)
            self.in_unplug_all = True
            self.plugged_before_unplug_all = dev.plugged_size
        else:
            if isinstance(ev, PlugRequest):
                self._adopt_plug_answer(i, ev)
            rtype = {PlugRequest: RequestType.PLUG, UnplugRequest: RequestType.UNPLUG}.get(
                type(ev), RequestType.STATE
            )
            req = Request(rtype, ev.addr, ev.nb_blocks)
        resp = Response.parse(dev.handle_request(req.pack()), request=req.type)
        report.requests += 1
        report.responses[resp.type.name] = report.responses.get(resp.type.name, 0) + 1
        report.plugged_sizes.append(dev.plugged_size)
        self._point(ev, "request")
        self.pending.append((ev, resp, req.type))

    def _response(self, ev: SendResponse) -> None:
        dev, report = self.device, self.report
        if not self.pending:
            report.mismatches.append(Mismatch(ev.line, "response without request", ev.type, None))
            return
        req_ev, resp, rtype = self.pending.pop(0)
        if resp.type is not ev.type:
            report.mismatches.append(Mismatch(ev.line, f"response to line {req_ev.line}", ev.type, resp.type))
        if ev.type is ResponseType.ACK and isinstance(req_ev, PlugRequest | UnplugRequest):
            delta = req_ev.nb_blocks * dev.block_size
            self.expected_plugged += delta if isinstance(req_ev, PlugRequest) else -delta
        elif ev.type is ResponseType.ACK and rtype is RequestType.UNPLUG_ALL:
            self.expected_plugged = 0
        if rtype is RequestType.UNPLUG_ALL:
            self.in_unplug_all = False
        if dev.plugged_size != self.expected_plugged:
            report.mismatches.append(
                Mismatch(ev.line, "plugged size", self.expected_plugged, dev.plugged_size)
            )
        self._flush(None)

    def _unplugged_all(self, i: int) -> None:
        dev = self.device
        reason = None
        nothing_plugged = (self.plugged_before_unplug_all if self.in_unplug_all else dev.plugged_size) == 0
        if nothing_plugged:
            reason = "unplug-all with nothing plugged (QEMU < 8.0 discards anyway)"
        if not self.in_unplug_all:
            # A system reset: QEMU unplugs everything and sizes the usable region from
            # requested-size, which the resize logged next reveals; adopt it first.
            resize = self._post_unplug_all_resize(i)
            if resize is not None:
                self._adopt_usable(resize)
            dev.system_reset()
            self.expected_plugged = 0
            self._point(self.evs[i], "reset")
        self._flush(reason)

    def _resized(self, i: int, ev: ResizedUsableRegion) -> None:
        dev, report = self.device, self.report
        self._flush(None)
        after_unplug_all = i > 0 and isinstance(self.evs[i - 1], UnpluggedAll)
        if not after_unplug_all:
            # Realize, or a requested-size write that did not shrink the usable region.
            self._adopt_usable(ev)
        report.usable_region_sizes.append(dev.usable_region_size)
        self._point(ev, "resize")
        if dev.usable_region_size != ev.new_size:
            report.mismatches.append(
                Mismatch(ev.line, "usable region size", ev.new_size, dev.usable_region_size)
            )

    def _point(self, ev: TraceEvent, kind: str) -> None:
        dev = self.device
        self.report.timeline.append(
            ReplayPoint(
                self.report.requests, ev.line, ev.timestamp, kind, dev.requested_size, dev.plugged_size,
                dev.usable_region_size, dict(self.probe()) if self.probe is not None else {},
            )
        )  # fmt: skip

    def _flush(self, skip_reason: str | None) -> None:
        _flush_discards(self.discards, self.base, self.report, skip_reason=skip_reason)


def _replay(
    evs: list[TraceEvent],
    device: VirtioMem,
    report: ReplayReport,
    probe: Callable[[], Mapping[str, int | None]] | None = None,
) -> None:
    _Replayer(evs, device, report, probe).run()


def _flush_discards(
    pending: list[DiscardRange], base: int | None, report: ReplayReport, *, skip_reason: str | None
) -> None:
    for d in pending:
        if skip_reason is not None and report.logged_discards:
            report.skipped_discards.append((d.line, skip_reason))
            continue
        assert base is not None
        report.logged_discards.append((d.host_address - base, d.length))
    pending.clear()
