"""What a machine reports: sizes per device, the full status and cheap samples.

Rules (every function: the caller holds ``m.lock``; figures are bytes or counts):

* ``plugged`` / ``requested`` / ``region_size`` sum over devices; ``guest_touched`` is
  what the workload wrote; ``resident`` is the VM's RAM held in memory (mincore);
  ``stale_pinned`` is memory the guest gave back that pins still hold; ``held`` =
  ``resident + stale_pinned`` is what the VM really costs the host; ``rss``, ``vm_pin``,
  ``vm_lck`` are this process's /proc counters, read by the caller (``ps``) before it
  takes the lock.
* Nothing here changes the machine.
"""

from __future__ import annotations

from typing import Any

from ramdiscard.hostmem import ProcStatus
from ramdiscard.machine.consumers import KvmConsumer, VfioConsumer
from ramdiscard.machine.parts import MachineParts


def sizes(m: MachineParts, dev_id: str) -> dict[str, int]:
    """block-size, addr, region size, usable, plugged ("size") and requested sizes."""
    d = m.device(dev_id)
    return {
        "block-size": d.block_size,
        "addr": d.addr,
        "region-size": d.region_size,
        "usable-region-size": d.usable_region_size,
        "size": d.plugged_size,
        "requested-size": d.requested_size,
    }


def sample(m: MachineParts, ps: ProcStatus) -> dict[str, int]:
    """Cheap figures for time series: plugged, rss, vm_pin, vm_lck, dma mappings."""
    return {
        "plugged": sum(d.plugged_size for d in m.devices.values()),
        "rss": ps.vm_rss,
        "vm_pin": ps.vm_pin,
        "vm_lck": ps.vm_lck,
        "dma_mappings": sum(c.container.mapping_count for c in m.consumers if isinstance(c, VfioConsumer)),
    }


def status(m: MachineParts, ps: ProcStatus) -> dict[str, Any]:
    """All figures (module rules), per device and per consumer too."""
    resident = sum(b.resident_bytes() for b in m.blocks if not b.closed)
    vfio = [c for c in m.consumers if isinstance(c, VfioConsumer)]
    kvm = [c for c in m.consumers if isinstance(c, KvmConsumer)]
    stale = sum(c.stale_pinned_bytes() for c in m.consumers)
    devices = {}
    for dev_id, d in m.devices.items():
        drv = m.drivers[dev_id]
        devices[dev_id] = {
            **sizes(m, dev_id),
            "memslots": d.nb_memslots,
            "mapped-memslots": d.mapped_memslots,
            "driver": drv.state.value,
            "driver-plugged": drv.plugged_size,
            "requests": len(drv.log),
            "metrics": d.metrics.as_dict(),
        }
    return {
        "plugged": sum(d.plugged_size for d in m.devices.values()),
        "requested": sum(d.requested_size for d in m.devices.values()),
        "region_size": sum(d.region_size for d in m.devices.values()),
        "boot_ram": m.scenario.boot_ram,
        "guest_touched": m.workload.touched_bytes if m.workload else 0,
        "resident": resident,
        "stale_pinned": stale,
        "held": resident + stale,
        "rss": ps.vm_rss,
        "vm_pin": ps.vm_pin,
        "vm_lck": ps.vm_lck,
        "pinned": sum(c.pinned_bytes for c in m.consumers),
        "dma_mappings": sum(c.container.mapping_count for c in vfio),
        "memslots": sum(c.memslots.slot_count for c in kvm) if kvm else None,
        "requests": m.requests,
        "devices": devices,
        "consumers": [c.status() for c in m.consumers],
    }
