"""``ramdiscard replay TRACE``: a real QEMU virtio-mem trace through the device and a consumer.

Geometry (address, region size, block size) comes from the trace unless given: the
address from ``memory_device_(pre_)plug``, the region size from the first
``ram_block_discard_range`` (realize discards the whole block), the block size from an
acknowledged unplug's discard length divided by its ``nb_blocks``.
"""

from __future__ import annotations

import argparse
import json
from enum import IntEnum
from typing import Any

from ramdiscard.cli.plots import check_plot_path, write_replay_plot
from ramdiscard.consumers.vfio.limits import RdmRange, smallest_granularity, worst_case_mappings
from ramdiscard.machine import KvmConsumer, Machine, VfioConsumer, scenario_from_dict
from ramdiscard.machine.scenario import ScenarioError
from ramdiscard.replay.events import (
    DiscardRange,
    MemoryDevicePlug,
    MemoryDevicePrePlug,
    SendResponse,
    TraceLog,
    UnplugRequest,
    parse_trace_file,
)
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import MiB, format_size, is_power_of_2


def infer_geometry(log: TraceLog) -> dict[str, Any]:
    """(id, addr, region size, block size) found in the trace; missing ones are None."""
    out: dict[str, Any] = {"id": None, "addr": None, "region_size": None, "block_size": None}
    evs = log.events
    for ev in evs:
        if isinstance(ev, MemoryDevicePlug | MemoryDevicePrePlug) and out["addr"] is None:
            out["addr"], out["id"] = ev.addr, ev.id
        if isinstance(ev, DiscardRange) and out["region_size"] is None:
            out["region_size"], out["region_size_line"] = ev.length, ev.line
    for i, ev in enumerate(evs):
        if isinstance(ev, UnplugRequest) and ev.nb_blocks:
            for nxt in evs[i + 1 : i + 3]:
                if isinstance(nxt, DiscardRange):
                    bs = nxt.length // ev.nb_blocks
                    if is_power_of_2(bs) and bs * ev.nb_blocks == nxt.length:
                        out["block_size"] = bs
                    break
                if isinstance(nxt, SendResponse):
                    break
            if out["block_size"]:
                break
    return out


def smallest_block_size(addr: int, region_size: int, limit: int, max_memslots: int) -> int | None:
    """Smallest power-of-two block size >= 1 MiB for which QEMU's DMA check passes."""
    return smallest_granularity([RdmRange(addr, region_size, MiB)], max_memslots, limit)


def run_replay(args: argparse.Namespace) -> int:
    log = parse_trace_file(args.trace)
    geo = infer_geometry(log)
    notes: list[str] = []
    addr = args.addr if args.addr is not None else geo["addr"]
    region = args.region_size if args.region_size is not None else geo["region_size"]
    block = args.block_size if args.block_size is not None else geo["block_size"]
    if addr is None:
        addr = 0x1_0000_0000
        notes.append("no memory_device_plug event: assuming addr 0x100000000 (use --addr)")
    if region is None:
        raise ValueError(
            f"{args.trace}: no ram_block_discard_range event to infer the region size; use --region-size"
        )
    if block is None:
        block = 2 * MiB
        notes.append(
            "block size not recoverable from the trace (no acknowledged unplug): "
            "assuming 2M (use --block-size)"
        )
    if args.dma_limit < 1 or args.max_memslots < 0:
        raise ValueError("--dma-limit must be >= 1 and --max-memslots >= 0")
    dev_id = geo["id"] or "vmem0"
    consumers: list[dict[str, Any]] = []
    if args.consumer == "vfio":
        consumers.append({"type": "vfio", "id": "vfio0", "backend": args.backend, "dma-limit": args.dma_limit,
                          "dma-limit-check": False})  # fmt: skip
    elif args.consumer == "kvm":
        consumers.append({"type": "kvm", "id": "kvm0", "mode": "model"})
    device: dict[str, Any] = {"id": dev_id, "size": region, "block-size": block, "addr": addr}
    if args.dynamic_memslots:
        device["dynamic-memslots"] = True
        if args.memslot_limit:
            device["memslot-limit"] = args.memslot_limit
    try:
        sc = scenario_from_dict(
            {"name": "replay", "boot-ram": 0, "devices": [device], "consumers": consumers}, source=args.trace
        )
    except ScenarioError as exc:
        if args.region_size is None and "devices[0].size" in str(exc):
            raise ValueError(
                f"{args.trace}:{geo['region_size_line']}: ram_block_discard_range length {region:#x} "
                "cannot be the region size (not a positive multiple of the block size within the "
                "address space); use --region-size"
            ) from None
        raise
    if args.plot:
        check_plot_path(args.plot)
    machine = Machine.from_scenario(sc)
    try:
        dev = machine.devices[dev_id]
        peak_memslots = [dev.mapped_memslots]

        def on_size(_id: str, _size: int) -> None:
            peak_memslots[0] = max(peak_memslots[0], dev.mapped_memslots)

        dev.add_size_change_notifier(on_size)
        vfio = next((c for c in machine.consumers if isinstance(c, VfioConsumer)), None)

        def probe() -> dict[str, int | None]:
            if vfio is None:
                return {"pinned": None, "dma_mappings": None}
            return {"pinned": vfio.container.mapped_bytes, "dma_mappings": vfio.container.mapping_count}

        report = replay_trace(log, dev, probe=probe)
        kvm = next((c for c in machine.consumers if isinstance(c, KvmConsumer)), None)
        worst = worst_case_mappings([RdmRange(addr, region, block)], args.max_memslots)
        result: dict[str, Any] = {
            "trace": args.trace,
            "geometry": {"id": dev_id, "addr": addr, "region_size": region, "block_size": block},
            "requests": report.requests,
            "responses": report.responses,
            "mismatches": [
                {
                    "line": m.line,
                    "what": m.what,
                    "logged": _json_value(m.logged),
                    "replayed": _json_value(m.replayed),
                }
                for m in report.mismatches
            ],
            "skipped_discards": len(report.skipped_discards),
            "peak_plugged": max(report.plugged_sizes, default=0),
            "consumer": args.consumer,
            "peak_pinned": vfio.container.peak_mapped_bytes if vfio else None,
            "peak_dma_mappings": vfio.container.peak_mapping_count if vfio else None,
            "dma_limit": args.dma_limit,
            "qemu_dma_check": {
                "worst_case": worst,
                "max_memslots": args.max_memslots,
                "passes": worst <= args.dma_limit,
                "smallest_block_size": smallest_block_size(addr, region, args.dma_limit, args.max_memslots),
            },
            "refused_maps": vfio.container.refused_maps if vfio else None,
            "memslots": {
                "dynamic": args.dynamic_memslots,
                "device_memslots": dev.nb_memslots,
                "memslot_size": dev.memslot_size,
                "peak_mapped": peak_memslots[0],
                "peak_kvm_memslots": kvm.memslots.peak_slots if kvm else None,
            },
            "notes": notes,
        }
    finally:
        machine.close()
    if args.plot:
        result["plot"] = str(write_replay_plot(report.timeline, args.plot, title=f"{args.trace}: {dev_id}"))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0 if not result["mismatches"] else 3


def _json_value(value: object) -> Any:
    """A mismatch value as JSON: sizes and counts stay numbers, response and block-state
    codes become their names, (offset, length) pairs become lists, None becomes null."""
    if isinstance(value, IntEnum):
        return value.name
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    return str(value)


def _text_value(value: object) -> str:
    if isinstance(value, IntEnum):
        return value.name
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    return str(value)


def _print(r: dict[str, Any]) -> None:
    g = r["geometry"]
    print(f"trace: {r['trace']}")
    print(
        f"device {g['id']}: {format_size(g['region_size'])} at {g['addr']:#x}, "
        f"block size {format_size(g['block_size'])}"
    )
    resp = ", ".join(f"{k} {v}" for k, v in sorted(r["responses"].items()))
    print(f"requests replayed: {r['requests']} ({resp}); peak plugged {format_size(r['peak_plugged'])}")
    if r["mismatches"]:
        print(f"responses/effects that differ from QEMU's log: {len(r['mismatches'])}")
        for m in r["mismatches"][:20]:
            print(
                f"  line {m['line']}: {m['what']}: logged {_text_value(m['logged'])}, "
                f"replayed {_text_value(m['replayed'])}"
            )
    else:
        print("responses that differ from QEMU's log: 0")
    if r["skipped_discards"]:
        print(
            f"logged discards not expected from this device (QEMU < 8.0 behaviour): {r['skipped_discards']}"
        )
    if r["consumer"] == "vfio":
        chk = r["qemu_dma_check"]
        print(f"peak pinned memory: {format_size(r['peak_pinned'])}")
        print(
            f"peak DMA mappings: {r['peak_dma_mappings']} of {r['dma_limit']} allowed; "
            f"refused maps {r['refused_maps']}"
        )
        smallest = chk["smallest_block_size"]
        print(
            f"QEMU 10.2 worst-case check: {chk['worst_case']} mappings (region / block size + "
            f"{chk['max_memslots']} memslots - 1) -> {'passes' if chk['passes'] else 'FAILS'}; "
            "smallest block size "
            f"that passes: {format_size(smallest) if smallest else 'none'}"
        )
    ms = r["memslots"]
    if ms["dynamic"]:
        print(
            f"dynamic memslots: {ms['device_memslots']} of {format_size(ms['memslot_size'])}, "
            f"peak mapped {ms['peak_mapped']}"
        )
    if ms["peak_kvm_memslots"] is not None:
        print(f"peak KVM memslots: {ms['peak_kvm_memslots']}")
    for n in r["notes"]:
        print(f"note: {n}")
    if r.get("plot"):
        print(f"plot written to {r['plot']}")
