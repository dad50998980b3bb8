"""Fault injection for host operations.

Rules:

* Every effectful host operation (discard, populate, pin, unpin, mlock, KVM ioctl, socket
  send/recv, file write) calls :func:`checkpoint` with its operation name *before* it
  changes anything. With no plan active this is one attribute test.
* A plan makes the N-th call (1-based, counted from the moment the plan is installed) of
  an operation raise :class:`InjectedFault`, an ``OSError`` subclass carrying the chosen
  errno, exactly as if the kernel had refused the call.
* :func:`counting` records how many times each operation is reached, so a test can first
  count the calls of a scenario, then sweep N over 1..count.

Plans are process-wide (host operations run on any thread) and protected by a lock.
"""

from __future__ import annotations

import errno as _errno
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum

from ramdiscard.errors import HostMemoryError


class Op(StrEnum):
    """Names of the host operations that can be made to fail."""

    DISCARD = "discard"
    POPULATE = "populate"
    PIN = "pin"
    UNPIN = "unpin"
    MLOCK = "mlock"
    MUNLOCK = "munlock"
    KVM_IOCTL = "kvm_ioctl"
    SOCK_SEND = "sock_send"
    SOCK_RECV = "sock_recv"
    FILE_WRITE = "file_write"
    FILE_READ = "file_read"
    MMAP = "mmap"


class InjectedFault(HostMemoryError):
    """Raised by :func:`checkpoint` when an active plan says this call fails."""


@dataclass
class _Plan:
    ops: frozenset[str] | None  # None: every operation
    nth: int
    errno: int
    repeat: bool
    seen: int = 0
    fired: int = 0


@dataclass
class CallLog:
    """Counts of calls per operation, filled while :func:`counting` is active."""

    counts: Counter[str] = field(default_factory=Counter)
    sequence: list[str] = field(default_factory=list)
    """Every call in order, so the op of call N of a sweep is ``sequence[N - 1]``."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_lock = threading.Lock()
_plans: list[_Plan] = []
_logs: list[CallLog] = []
_enabled = False


def _refresh() -> None:
    global _enabled
    _enabled = bool(_plans or _logs)


def active() -> bool:
    """True while a plan or a call log is installed. A batched host operation may test
    this once and skip its per-item :func:`checkpoint` calls when it is False, since they
    would all be no-ops."""
    return _enabled


def checkpoint(op: str) -> None:
    """Called by a host operation before it acts; raises InjectedFault if a plan says so."""
    if not _enabled:
        return
    with _lock:
        for log in _logs:
            log.counts[op] += 1
            log.sequence.append(op)
        for plan in _plans:
            if plan.ops is not None and op not in plan.ops:
                continue
            plan.seen += 1
            if plan.seen == plan.nth or (plan.repeat and plan.seen >= plan.nth):
                plan.fired += 1
                code = plan.errno
                raise InjectedFault(
                    code,
                    f"injected fault: {op} call #{plan.seen} failed ({_errno.errorcode.get(code, code)})",
                )


@contextmanager
def inject(
    ops: str | Op | tuple[str | Op, ...] | None = None,
    nth: int = 1,
    errno: int = _errno.ENOMEM,
    *,
    repeat: bool = False,
) -> Iterator[_Plan]:
    """Make the ``nth`` call of ``ops`` (one name, a tuple, or None for any) fail.

    With ``repeat`` every call from the nth on fails. The yielded plan's ``fired`` says
    how many faults were raised.
    """
    if nth < 1:
        raise ValueError("nth is 1-based")
    selected: frozenset[str] | None
    if ops is None:
        selected = None
    elif isinstance(ops, str):
        selected = frozenset({str(ops)})
    else:
        selected = frozenset(str(o) for o in ops)
    plan = _Plan(selected, nth, errno, repeat)
    with _lock:
        _plans.append(plan)
        _refresh()
    try:
        yield plan
    finally:
        with _lock:
            _plans.remove(plan)
            _refresh()


@contextmanager
def counting() -> Iterator[CallLog]:
    """Count calls of every operation while the block runs."""
    log = CallLog()
    with _lock:
        _logs.append(log)
        _refresh()
    try:
        yield log
    finally:
        with _lock:
            _logs.remove(log)
            _refresh()
