"""QMP fuzzing: target ``qmp``, the sans-I/O protocol and the command dispatcher.

The input is the byte stream a client sends. It is fed to one
:class:`~ramdiscard.qmp.protocol.QmpConnection` in one piece and to a second one cut into
chunks (sizes derived from the input), and every command is dispatched to a
:class:`~ramdiscard.qmp.commands.CommandDispatcher` over a backend that drives a real
virtio-mem device (``qom-set requested-size`` reaches the device; ``x-ramdiscard-migrate``
and ``-dump`` are refused so that a fuzzed path never touches the file system).

Documented outcomes: both connections yield the same items (framing does not depend on
chunking); every protocol reply is one CRLF-terminated JSON object with exactly one of
``return``/``error`` (plus an optional ``id``); the dispatcher raises nothing but
``QmpError``, and every success value encodes as JSON. After the input the device is
consistent and its requested size is the last one accepted through ``qom-set``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Hashable
from typing import Any

from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.invariants import check_device
from ramdiscard.fuzz.targets.virtio import ADDR, BS, SIZE, FakeRam
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy


def _unavailable() -> str | None:
    if importlib.util.find_spec("ramdiscard.qmp") is None:
        return "ramdiscard.qmp is not on this branch"
    return None


class _Backend:
    """A QmpBackend over one device (see the module docstring)."""

    def __init__(self, dev: VirtioMem) -> None:
        self.dev = dev
        self.accepted: list[int] = []

    def memory_devices(self) -> list[Any]:
        from ramdiscard.qmp import MemoryDeviceInfo

        d = self.dev
        return [
            MemoryDeviceInfo(
                d.id, d.addr, d.requested_size, d.plugged_size, d.region_size, d.block_size, "mem0"
            )
        ]

    def set_requested_size(self, device_id: str, size: int) -> None:
        assert device_id == self.dev.id, device_id
        self.dev.requested_size = size
        self.accepted.append(size)

    def status(self) -> dict[str, Any]:
        return {"plugged": self.dev.plugged_size}

    def migrate(self, uri: str) -> dict[str, Any]:
        from ramdiscard.qmp import QmpError

        raise QmpError("migration is disabled in the fuzz backend")

    def dump(self, path: str) -> dict[str, Any]:
        from ramdiscard.qmp import QmpError

        raise QmpError("dump is disabled in the fuzz backend")

    def add_size_change_listener(self, fn: Callable[[str, int], None]) -> Callable[[], None]:
        return lambda: None

    def close(self) -> None:
        pass


def _check_reply(data: bytes) -> str:
    assert data.endswith(b"\r\n"), data[-20:]
    msg = json.loads(data)
    assert isinstance(msg, dict), msg
    keys = set(msg) - {"id"}
    assert keys in ({"return"}, {"error"}), msg
    if "error" in msg:
        err = msg["error"]
        assert set(err) == {"class", "desc"} and isinstance(err["desc"], str), err
        return f"error:{err['class']}:{err['desc'][:24]}"
    return "return"


class QmpHarness:
    def __init__(self) -> None:
        self.policy = DiscardPolicy()

    def close(self) -> None:
        pass

    def deep_check(self) -> None:
        pass

    def run(self, data: bytes) -> Hashable:
        from ramdiscard.qmp import CommandDispatcher, QmpConnection, QmpError
        from ramdiscard.qmp.protocol import Execute, Reply

        version = {"qemu": {"major": 9, "minor": 2, "micro": 0}, "package": "ramdiscard-fuzz"}
        whole = QmpConnection(version, max_message=4096, max_nesting=32)
        pieces = QmpConnection(version, max_message=4096, max_nesting=32)
        whole.greeting()
        items = whole.receive_data(data)
        digest = hashlib.sha256(data).digest()
        chunked: list[Any] = []
        pos, i = 0, 0
        while pos < len(data):
            n = 1 + digest[i % len(digest)] % 17
            chunked += pieces.receive_data(data[pos : pos + n])
            pos, i = pos + n, i + 1
        assert items == chunked, "framing depends on how the stream was cut"

        mr = MemoryRegion.new_ram("fuzz-qmp", FakeRam(SIZE))
        dev = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=0, policy=self.policy)
        backend = _Backend(dev)
        dispatcher = CommandDispatcher(backend, version)
        kinds: list[str] = []
        try:
            for item in items:
                if isinstance(item, Reply):
                    kinds.append(_check_reply(item.data))
                    continue
                assert isinstance(item, Execute)
                try:
                    outcome = dispatcher.execute(item.name, item.arguments)
                except QmpError as exc:
                    kinds.append(_check_reply(whole.error_bytes(item, exc)))
                    continue
                kinds.append(f"{item.name}:{_check_reply(whole.return_bytes(item, outcome.value))}")
            check_device(dev)
            want = backend.accepted[-1] if backend.accepted else 0
            assert dev.requested_size == want, (dev.requested_size, want)
        finally:
            dev.unrealize()
        return tuple(sorted(set(kinds)))[:32]


def _seeds() -> list[bytes]:
    neg = b'{"execute": "qmp_capabilities"}'
    return [
        neg + b'{"execute": "query-memory-devices", "id": 1}',
        neg + b'{"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", '
        b'"value": 16777216}, "id": "a"}{"execute": "qom-get", "arguments": {"path": '
        b'"/machine/peripheral/vmem0", "property": "requested-size"}}',
        neg + b'{"execute": "qom-list", "arguments": {"path": "/machine"}}\n{"execute": "query-commands"}',
        b'{"execute": "query-status"}' + neg + b'{"execute": "qmp_capabilities"}[1, 2]"str"{"id": 5}',
        neg + b'{"execute": "qom-set", "arguments": {"path": "vmem0", "property": "requested-size", '
        b'"value": -2097152}}{"execute": "x-ramdiscard-status"}\xff{"execute": "quit"}',
        neg
        + b'{"execute": "qom-get", "arguments": {"path": "..", "property": "type"}}{"a": [[[[[[[[{}]]]]]]]]}',
        neg + b'{"execute": "x-ramdiscard-migrate", "arguments": {"uri": "file:/tmp/x"}}{"execute": 1e999}',
    ]


QMP_TARGET = Target(
    "qmp",
    "QMP byte streams: framing (whole vs chunked), request checks, dispatch to a real device",
    _seeds,
    QmpHarness,
    max_size=4096,
    deep_every=1 << 30,
    unavailable=_unavailable,
)
