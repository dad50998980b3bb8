"""Helpers of the QMP migration commands (:mod:`ramdiscard.qmp.migration_commands`)."""

from __future__ import annotations

from typing import Any

from ramdiscard.units import format_size


class GuestOfMachine:
    """GuestControl over the machine's writer (the vCPUs)."""

    def __init__(self, machine: Any) -> None:
        self.machine = machine

    def pause(self) -> None:
        w = getattr(self.machine, "writer", None)
        if w is not None:
            w.pause()

    def resume(self) -> None:
        w = getattr(self.machine, "writer", None)
        if w is not None:
            w.resume()


def dma_holders(machine: object) -> list[str]:
    """``"ID holds SIZE of DMA pins"`` for every consumer of ``machine`` holding pins on
    guest memory now (a device may DMA into it); the caller holds the machine lock."""
    out = []
    for c in getattr(machine, "consumers", ()):
        pinned = int(getattr(c, "pinned_bytes", 0))
        if pinned:
            out.append(f"{c.id} holds {format_size(pinned)} of DMA pins")
    return out
