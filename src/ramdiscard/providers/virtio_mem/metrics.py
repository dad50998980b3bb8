"""Counters of one virtio-mem device.

Rules: counters only grow (until :meth:`VirtioMemMetrics.reset`); they are updated under
the device lock after the request's outcome is known, so a snapshot taken between
requests is consistent: ``sum(requests) == sum(responses)``. Protocol violations and
requests refused while broken have no request type and no response; they are counted
separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ramdiscard.providers.virtio_mem.wire import RequestType, ResponseType

# Counter keys per type, precomputed: Enum.name is a Python-level property, slow on the
# request path (the device increments the dicts directly with these).
REQUEST_KEYS = {t: t.name.lower() for t in RequestType}
RESPONSE_KEYS = {t: t.name.lower() for t in ResponseType}


def _per_request() -> dict[str, int]:
    return {t.name.lower(): 0 for t in RequestType}


def _per_response() -> dict[str, int]:
    return {t.name.lower(): 0 for t in ResponseType}


@dataclass
class VirtioMemMetrics:
    """Request/response counters and plugged/unplugged byte totals."""

    requests: dict[str, int] = field(default_factory=_per_request)
    """Requests per type (``plug``, ``unplug``, ``unplug_all``, ``state``)."""
    responses: dict[str, int] = field(default_factory=_per_response)
    """Responses per code (``ack``, ``nack``, ``busy``, ``error``)."""
    plugged_bytes: int = 0
    """Bytes plugged by ACKed PLUG requests."""
    unplugged_bytes: int = 0
    """Bytes unplugged by ACKed UNPLUG / UNPLUG_ALL requests and system resets."""
    busy_count: int = 0
    """Requests refused because the device was busy (migration)."""
    host_failures: int = 0
    """Host discard/populate failures (answered BUSY)."""
    listener_refusals: int = 0
    """Populate notifications refused by a listener (answered BUSY)."""
    protocol_errors: int = 0
    """Protocol violations (short request, unknown type) that broke the device."""
    broken_refusals: int = 0
    """Requests refused because the device was broken."""
    config_writes_ignored: int = 0
    """Driver writes to the read-only config space (ignored)."""

    def count_request(self, rtype: RequestType) -> None:
        self.requests[REQUEST_KEYS[rtype]] += 1

    def count_response(self, rtype: ResponseType) -> None:
        self.responses[RESPONSE_KEYS[rtype]] += 1

    @property
    def errors(self) -> int:
        """ERROR responses plus protocol violations."""
        return self.responses["error"] + self.protocol_errors

    def as_dict(self) -> dict[str, object]:
        """A JSON-friendly copy: nested dicts for the per-type counters."""
        out = asdict(self)
        out["errors"] = self.errors
        return out

    def reset(self) -> None:
        fresh = VirtioMemMetrics()
        for f in fields(self):
            setattr(self, f.name, getattr(fresh, f.name))
