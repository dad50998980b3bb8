"""DiscardPolicy: who may discard RAM, and who forbids it (QEMU's four counters).

Rules:

* ``require`` (R): something needs discards of any kind to work.
* ``coordinated_require`` (Rc): something discards only through a RamDiscardManager
  (virtio-mem, guest_memfd attributes).
* ``disable`` (D): something cannot tolerate any discard (a consumer that pins all RAM
  without listening to a manager).
* ``uncoordinated_disable`` (Du): something tolerates coordinated discards only (a
  vfio-style consumer that listens to managers); balloon-style discards are refused.
* Taking a count fails with DiscardPolicyError, leaving every counter unchanged, when it
  conflicts: D with R or Rc; Du with R; R with D or Du; Rc with D. Releasing a count never
  conflicts; releasing one that was not taken raises.

Each memory system has one policy (:func:`policy_of`); components take it from the system
of the region they serve unless given an explicit ``policy`` argument.
:func:`default_policy` is the default system's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum

from ramdiscard.errors import DiscardPolicyError
from ramdiscard.memory.system import MemorySystem, default_system


class DiscardCount(StrEnum):
    REQUIRE = "require"
    COORDINATED_REQUIRE = "coordinated-require"
    DISABLE = "disable"
    UNCOORDINATED_DISABLE = "uncoordinated-disable"


_CONFLICTS: dict[DiscardCount, tuple[DiscardCount, ...]] = {
    DiscardCount.DISABLE: (DiscardCount.REQUIRE, DiscardCount.COORDINATED_REQUIRE),
    DiscardCount.UNCOORDINATED_DISABLE: (DiscardCount.REQUIRE,),
    DiscardCount.REQUIRE: (DiscardCount.DISABLE, DiscardCount.UNCOORDINATED_DISABLE),
    DiscardCount.COORDINATED_REQUIRE: (DiscardCount.DISABLE,),
}

_MESSAGES = {
    DiscardCount.DISABLE: "Cannot disable discarding of RAM: it is required by {holders}",
    DiscardCount.UNCOORDINATED_DISABLE: (
        "Cannot disable uncoordinated discarding of RAM: it is required by {holders}"
    ),
    DiscardCount.REQUIRE: "Discarding RAM is disabled by {holders}",
    DiscardCount.COORDINATED_REQUIRE: "Discarding RAM is disabled by {holders}",
}


@dataclass(frozen=True)
class PolicySnapshot:
    require: int
    coordinated_require: int
    disable: int
    uncoordinated_disable: int


class DiscardPolicy:
    """The four counters, under one lock. See the module rules."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[DiscardCount, int] = dict.fromkeys(DiscardCount, 0)

    def _change(self, which: DiscardCount, state: bool) -> None:
        with self._lock:
            if state:
                holders = [c for c in _CONFLICTS[which] if self._counts[c] > 0]
                if holders:
                    names = ", ".join(f"{c.value} (count {self._counts[c]})" for c in holders)
                    raise DiscardPolicyError(_MESSAGES[which].format(holders=names))
                self._counts[which] += 1
            else:
                if self._counts[which] == 0:
                    raise DiscardPolicyError(f"release of {which.value} discard count that is not held")
                self._counts[which] -= 1

    def require(self, state: bool = True) -> None:
        """Take (or release) the require-any-discard count (R)."""
        self._change(DiscardCount.REQUIRE, state)

    def coordinated_require(self, state: bool = True) -> None:
        """Take (or release) the require-coordinated-discard count (Rc)."""
        self._change(DiscardCount.COORDINATED_REQUIRE, state)

    def disable(self, state: bool = True) -> None:
        """Take (or release) the disable-all-discards count (D)."""
        self._change(DiscardCount.DISABLE, state)

    def uncoordinated_disable(self, state: bool = True) -> None:
        """Take (or release) the disable-uncoordinated-discards count (Du)."""
        self._change(DiscardCount.UNCOORDINATED_DISABLE, state)

    @contextmanager
    def holding(self, which: DiscardCount | str) -> Iterator[None]:
        """Hold a count for the duration of a block."""
        which = DiscardCount(which)
        self._change(which, True)
        try:
            yield
        finally:
            self._change(which, False)

    def is_disabled(self) -> bool:
        """D > 0 or Du > 0: an uncoordinated discarder (balloon) must not free memory."""
        return self._counts[DiscardCount.DISABLE] > 0 or self._counts[DiscardCount.UNCOORDINATED_DISABLE] > 0

    def is_required(self) -> bool:
        return self._counts[DiscardCount.REQUIRE] > 0 or self._counts[DiscardCount.COORDINATED_REQUIRE] > 0

    def snapshot(self) -> PolicySnapshot:
        with self._lock:
            c = self._counts
            return PolicySnapshot(
                c[DiscardCount.REQUIRE],
                c[DiscardCount.COORDINATED_REQUIRE],
                c[DiscardCount.DISABLE],
                c[DiscardCount.UNCOORDINATED_DISABLE],
            )


def policy_of(system: MemorySystem) -> DiscardPolicy:
    """The discard policy of ``system`` (made on first use, one per system)."""
    return system.component(DiscardPolicy)


def default_policy() -> DiscardPolicy:
    """The default memory system's policy, used when a component is given none and serves
    no region of another system."""
    return policy_of(default_system())
