"""MachineParts: what a machine is made of, filled by the build and read by checkpoints
and figures.

Rules:

* A MachineParts holds the machine's own memory system (topology lock, RAM-block registry
  and DiscardPolicy nobody else shares), its RAM blocks, regions, devices, consumers, guest
  drivers and workload, the files it created and the guest states of its snapshots. It
  builds nothing itself: :func:`ramdiscard.machine.build.build` fills it in QEMU's order and
  :class:`~ramdiscard.machine.Machine` (a MachineParts with a guest thread and control
  methods) releases it.
* :attr:`lock` (an RLock) guards every part; the modules working on parts
  (:mod:`~ramdiscard.machine.build`, :mod:`~ramdiscard.machine.checkpoint`,
  :mod:`~ramdiscard.machine.figures`) are called with it held.
* A device's config change reaches its guest driver (:meth:`config_changed`) and wakes
  the machine's guest thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ramdiscard.errors import InvalidArgument
from ramdiscard.guest import Exchange, GuestDriver, TouchWorkload
from ramdiscard.guest.writer import GuestWriter
from ramdiscard.hostmem import RamBlock
from ramdiscard.machine.consumers import Consumer
from ramdiscard.machine.files import MachineFiles
from ramdiscard.machine.guest_memory import GuestMemory
from ramdiscard.machine.scenario import ADDRESS_LIMIT, Scenario
from ramdiscard.memory.address_space import AddressSpace
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.system import MemorySystem
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.ramblocks import registry_of
from ramdiscard.rdm.policy import DiscardPolicy, policy_of

OnRequest = Callable[[str, Exchange], None]
"""Called as ``fn(device_id, exchange)`` after every guest request."""

Fingerprint = dict[str, list[tuple[int, int, int]]]
"""Per RAM block: (region offset, length, checksum) of every populated run."""


@dataclass
class GuestState:
    """The guest model's state at a snapshot, and what the memory held then."""

    drivers: dict[str, GuestDriver]
    workload: TouchWorkload | None
    fingerprint: Fingerprint = field(default_factory=dict)


@dataclass
class Snapshots:
    """The guest state of each snapshot a machine took, by path, and the latest path."""

    by_path: dict[str, GuestState] = field(default_factory=dict)
    latest: str | None = None


class MachineParts:
    """The parts of one machine built from ``scenario``; see the module rules."""

    def __init__(self, scenario: Scenario, *, workdir: str | Path | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.scenario = scenario
        self.clock = clock
        self.lock = threading.RLock()
        self.notes: list[str] = []
        self.system = MemorySystem(scenario.name)
        self.policy = policy_of(self.system)
        self.uncoordinated_policy = DiscardPolicy()
        self.registry = registry_of(self.system)
        self.devices: dict[str, VirtioMem] = {}
        self.drivers: dict[str, GuestDriver] = {}
        self.consumers: list[Consumer] = []
        self.blocks: list[RamBlock] = []
        """Every RAM block, boot RAM first; closed at close."""
        self.workload: TouchWorkload | None = None
        self.writer: GuestWriter | None = None
        self.memory = GuestMemory()
        self.files = MachineFiles(workdir)
        self.root = MemoryRegion.new_container("system", ADDRESS_LIMIT, system=self.system)
        """The guest-physical address space's root container."""
        self.mapped: list[MemoryRegion] = []
        """Regions mapped into :attr:`root` by the build; unmapped at close, last first."""
        self.space: AddressSpace | None = None
        self.boot: MemoryRegion | None = None
        self.snapshots = Snapshots()
        self._wake = threading.Event()
        self._requests = 0

    @property
    def requests(self) -> int:
        """Guest requests sent so far (carried over by a migration)."""
        return self._requests

    def new_driver(self, dev_id: str) -> GuestDriver:
        """A fresh guest driver for ``dev_id`` (the guest's driver (re)loads), replacing
        the current one."""
        drv = GuestDriver(self.devices[dev_id], clock=self.clock, workload=self.workload)
        self.drivers[dev_id] = drv
        return drv

    def config_changed(self, dev: VirtioMem) -> None:
        """Device config-change notifier: the device's driver reacts; the guest thread wakes."""
        drv = self.drivers.get(dev.id)
        if drv is not None:
            drv.config_changed()
        self._wake.set()

    def device(self, dev_id: str) -> VirtioMem:
        """The device ``dev_id``; KeyError naming the known ids otherwise."""
        try:
            return self.devices[dev_id]
        except KeyError:
            raise KeyError(f"no virtio-mem device {dev_id!r} (devices: {', '.join(self.devices)})") from None

    def space_or_fail(self) -> AddressSpace:
        """The address space; InvalidArgument if the machine is closed or not built."""
        if self.space is None:
            raise InvalidArgument("machine has no address space (closed or not built)")
        return self.space
