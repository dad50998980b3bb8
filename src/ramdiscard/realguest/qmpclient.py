"""A minimal QMP client over an accepted socket (QEMU connects to ramdiscard).

Rules: :meth:`QmpClient.start` reads the greeting, negotiates capabilities and then runs
a reader thread. Events go to ``on_event(name, data)`` on that thread, in arrival order;
:meth:`QmpClient.execute` sends one command and waits (bounded by ``timeout``) for its
answer, raising :class:`QmpClientError` (one line) on an error answer, a timeout or a
closed connection.
"""

from __future__ import annotations

import contextlib
import json
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from ramdiscard.errors import ProtocolViolation


class QmpClientError(ProtocolViolation):
    """QEMU's QMP answered with an error, timed out or went away."""


class QmpClient:
    def __init__(self, conn: socket.socket, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self._conn = conn
        self._file = conn.makefile("rwb")
        self._on_event = on_event
        self._answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.closed = False

    def _read(self) -> dict[str, Any] | None:
        line = self._file.readline()
        if not line:
            return None
        value = json.loads(line)
        return value if isinstance(value, dict) else {}

    def start(self, timeout: float = 30.0) -> None:
        self._conn.settimeout(timeout)
        greeting = self._read()
        if greeting is None or "QMP" not in greeting:
            raise QmpClientError("QEMU's QMP sent no greeting")
        self._file.write(b'{"execute": "qmp_capabilities"}\n')
        self._file.flush()
        answer = self._read()
        if answer is None or "return" not in answer:
            raise QmpClientError(f"QEMU refused qmp_capabilities: {answer}")
        self._conn.settimeout(None)
        self._thread = threading.Thread(target=self._loop, name="qemu-qmp", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                msg = self._read()
                if msg is None:
                    break
                if "event" in msg:
                    self._on_event(str(msg["event"]), dict(msg.get("data", {})))
                else:
                    self._answers.put(msg)
        except (OSError, ValueError):
            pass
        finally:
            self.closed = True
            self._answers.put(None)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with self._lock:
            if self.closed:
                raise QmpClientError(f"{command}: QEMU's QMP connection is closed")
            try:
                self._file.write(json.dumps(request).encode() + b"\n")
                self._file.flush()
            except OSError as exc:
                raise QmpClientError(f"{command}: {exc}") from None
            try:
                answer = self._answers.get(timeout=timeout)
            except queue.Empty:
                raise QmpClientError(f"{command}: no answer from QEMU within {timeout} s") from None
        if answer is None:
            raise QmpClientError(f"{command}: QEMU's QMP connection closed")
        if "error" in answer:
            raise QmpClientError(f"{command}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)
        self._file.close()
        self._conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)
