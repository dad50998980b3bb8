"""``ramdiscard demo``: a manager with two listeners over overlapping sections.

This is the core-only scenario; it shows registration replay, clipping, rollback and
unregistration on a BlockStateManager.
"""

from __future__ import annotations

import argparse
import json

from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.section import MemoryRegionSection
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.units import MiB, format_size


class _Printer(RamDiscardListener):
    def __init__(self, name: str, log: list[dict[str, object]], refuse_once: bool = False) -> None:
        self.name = name
        self.log = log
        self.refuse_once = refuse_once

    def notify_populate(self, section: MemoryRegionSection) -> None:
        if self.refuse_once:
            self.refuse_once = False
            self.log.append(
                {"listener": self.name, "event": "refuse", "offset": section.offset_within_region}
            )
            raise RuntimeError(f"{self.name} refuses")
        self.log.append(
            {
                "listener": self.name,
                "event": "populate",
                "offset": section.offset_within_region,
                "size": section.size,
            }
        )

    def notify_discard(self, section: MemoryRegionSection) -> None:
        self.log.append(
            {
                "listener": self.name,
                "event": "discard",
                "offset": section.offset_within_region,
                "size": section.size,
            }
        )


def run_demo(args: argparse.Namespace) -> int:
    log: list[dict[str, object]] = []
    with _demo_region() as mr:
        m = BlockStateManager(mr, 2 * MiB)
        m.set_populated(0, 8 * MiB)
        a = _Printer("dma-a", log)
        b = _Printer("dma-b", log, refuse_once=True)
        m.register_listener(a, MemoryRegionSection(mr, 0, 32 * MiB))
        m.register_listener(b, MemoryRegionSection(mr, 16 * MiB, 48 * MiB, 0x1_0000_0000))
        try:
            m.set_populated(14 * MiB, 8 * MiB)
        except RuntimeError:
            log.append({"event": "rolled back", "populated": m.populated_size})
        m.set_populated(14 * MiB, 8 * MiB)
        m.set_discarded(0, 16 * MiB)
        m.unregister_listener(a)
        m.unregister_listener(b)
        summary = {"populated": m.populated_size, "events": log}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for e in log:
            print("  ".join(f"{k}={_show(k, v)}" for k, v in e.items()))
        print(f"populated at the end: {format_size(summary['populated'])}")  # type: ignore[arg-type]
    return 0


def _show(key: str, value: object) -> str:
    if key in ("size", "offset", "populated") and isinstance(value, int):
        return format_size(value)
    return str(value)


class _demo_region:
    def __enter__(self) -> MemoryRegion:
        self.mr = MemoryRegion.new_ram("demo-ram", 64 * MiB)
        return self.mr

    def __exit__(self, *exc: object) -> None:
        ram = self.mr.ram
        close = getattr(ram, "close", None)
        if close is not None:
            close()
