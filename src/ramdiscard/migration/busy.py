"""Freezing virtio-mem devices while a migration, snapshot or restore runs.

Rules (qemu-ram-discard §3.10, §5.1 invariant 9):

* While frozen, every device answers PLUG, UNPLUG and UNPLUG_ALL with BUSY, so the
  populated runs read at the start stay valid until the end.
* The predicate a device had before is kept: the device stays busy if it was busy for
  another reason, and gets its old predicate back afterwards, also when the migration
  fails or is interrupted.
* :attr:`Freeze.active` can be cleared early: the destination does that before it resets
  its devices after a failed restore (an UNPLUG_ALL while frozen would be refused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ramdiscard.providers.virtio_mem import VirtioMem


class Freeze:
    """Handle of a freeze; ``active`` is what every installed predicate answers."""

    def __init__(self) -> None:
        self.active = True


def _predicate(freeze: Freeze, previous: Callable[[], bool] | None) -> Callable[[], bool]:
    def busy() -> bool:
        return freeze.active or (previous is not None and bool(previous()))

    return busy


@contextmanager
def frozen(devices: Sequence[VirtioMem]) -> Iterator[Freeze]:
    """Make every device busy for the duration of the block (module rules)."""
    freeze = Freeze()
    installed: list[tuple[VirtioMem, Callable[[], bool] | None]] = []
    try:
        for dev in devices:
            previous = dev.busy_predicate  # restored when the block ends
            dev.set_busy_predicate(_predicate(freeze, previous))
            installed.append((dev, previous))
        yield freeze
    finally:
        freeze.active = False
        for dev, previous in reversed(installed):
            dev.set_busy_predicate(previous)
