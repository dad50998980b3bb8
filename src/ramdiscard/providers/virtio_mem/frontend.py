"""The guest-facing side of a virtio-mem device: features, request parsing, broken state.

Rules:

* The offered features are fixed at realize. The driver may accept only offered ones and
  must accept an offered UNPLUGGED_INACCESSIBLE (D-INIT-1); otherwise FeatureError and
  nothing changes.
* A protocol violation (a short request, an unknown request type, or one a transport
  reports through :meth:`Frontend.violation`) breaks the device: every later request
  raises :class:`DeviceBroken` (counted as a broken refusal) until :meth:`Frontend.reset`
  (a device or system reset), which also forgets the accepted features.
* A well-formed request goes to ``execute`` (the device's decide-and-apply) and its
  response is returned; nothing else is raised for any byte string.

Theory of operation: the front end holds no block state and takes no lock; the device
calls it with its locks held (topology lock first, then the manager lock), so a request is
parsed, refused or executed atomically with respect to every other device operation.
"""

from __future__ import annotations

from collections.abc import Callable

from ramdiscard.providers.virtio_mem.config import check_driver_features
from ramdiscard.providers.virtio_mem.metrics import VirtioMemMetrics
from ramdiscard.providers.virtio_mem.wire import (
    PACKED_RESPONSES,
    DeviceBroken,
    ProtocolError,
    Request,
    RequestType,
    Response,
    parse_request,
)

Execute = Callable[[RequestType, int, int], Response]
"""The device's decide-and-apply of one request ``(type, addr, nb_blocks)``."""


class Frontend:
    """Features and request intake of one device; see the module rules."""

    def __init__(self, prefix: str, offered: int, metrics: VirtioMemMetrics, execute: Execute) -> None:
        self.offered = offered
        self.accepted = 0
        self.broken = False
        self._prefix = prefix
        self._metrics = metrics
        self._execute = execute

    def negotiate(self, features: int) -> None:
        """Record the driver's accepted features; FeatureError (no change) if invalid."""
        check_driver_features(self._prefix, self.offered, features)
        self.accepted = features

    def reset(self) -> None:
        """Device reset: not broken, no features accepted."""
        self.broken = False
        self.accepted = 0

    def _refuse(self) -> DeviceBroken:
        self._metrics.broken_refusals += 1
        return DeviceBroken(f"{self._prefix} is broken after a protocol violation; reset it")

    def handle(self, data: bytes | bytearray | memoryview) -> bytes:
        """Parse, execute and pack one request (module rules)."""
        if self.broken:
            raise self._refuse()
        try:
            rtype, addr, nb_blocks = parse_request(data)
        except ProtocolError:
            self.broken = True
            self._metrics.protocol_errors += 1
            raise
        resp = self._execute(rtype, addr, nb_blocks)
        return PACKED_RESPONSES[resp.type] if resp.state is None else resp.pack()

    def process(self, req: Request) -> Response:
        """Execute a parsed request; DeviceBroken while broken."""
        if self.broken:
            raise self._refuse()
        return self._execute(req.type, req.addr, req.nb_blocks)

    def violation(self, reason: str) -> ProtocolError:
        """Break the device for a violation found outside the parser; returns the error
        for the caller to raise."""
        self.broken = True
        self._metrics.protocol_errors += 1
        return ProtocolError(f"{self._prefix} protocol violation: {reason}")
