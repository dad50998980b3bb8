"""What a scenario is: frozen specs for the machine, its devices, consumers, workload and
steps, and ScenarioError.

Rules:

* Every spec is a frozen value; nothing here checks anything (the table readers of this
  package do, and build these only from checked values).
* A :class:`DeviceSpec` built without ``block_size`` gets the virtio-mem device's own
  default for a memory backend of host base pages
  (:func:`~ramdiscard.providers.virtio_mem.config.default_block_size`), the same value the
  device would choose.
* A new step kind is a new :class:`Action` member; the machine runs it through its step
  table (:mod:`ramdiscard.machine.steps`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from ramdiscard.errors import InvalidArgument
from ramdiscard.providers.virtio_mem.config import default_block_size, host_page_size
from ramdiscard.units import GiB, MiB, format_size

ADDRESS_LIMIT = 1 << 48
"""The machine's guest-physical address space ("system" container size)."""


class ScenarioError(InvalidArgument):
    """A scenario is invalid; the message names the source and the key."""


class Backing(StrEnum):
    ANONYMOUS = "anonymous"
    MEMFD = "memfd"
    FILE = "file"


class DmaBackendKind(StrEnum):
    AUTO = "auto"
    IO_URING = "io_uring"
    MLOCK = "mlock"
    NULL = "null"


class ConsumerType(StrEnum):
    VFIO = "vfio"
    KVM = "kvm"
    BLOCKDMA = "blockdma"


class KvmMode(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    MODEL = "model"


class Action(StrEnum):
    RESIZE = "resize"
    UNPLUG_ALL = "unplug-all"
    SYSTEM_RESET = "system-reset"
    PAUSE = "pause"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    MIGRATE = "migrate"
    LIVE_MIGRATE = "live-migrate"
    DUMP = "dump"


class Transport(StrEnum):
    FILE = "file"
    TCP = "tcp"


def device_default_block_size() -> int:
    """The block size a virtio-mem device picks by itself for a memory backend of host
    base pages (anonymous, memfd, file)."""
    return default_block_size(host_page_size())


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    size: int
    block_size: int = field(default_factory=device_default_block_size)
    backing: Backing = Backing.ANONYMOUS
    thp: bool = True
    path: str | None = None
    addr: int | None = None
    requested_size: int = 0
    dynamic_memslots: bool = False
    memslot_limit: int = 0
    prealloc: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    type: ConsumerType
    id: str
    backend: DmaBackendKind = DmaBackendKind.AUTO
    coordinate_discards: bool = True
    dma_limit: int = 65535
    dma_limit_check: bool = True
    mode: KvmMode = KvmMode.AUTO
    iova_base: int = 1 << 32
    iova_size: int = (1 << 48) - (1 << 32)
    iova_align: int = 2 * MiB


@dataclass(frozen=True)
class WorkloadSpec:
    touch: float = 0.0
    write_rate: int = 0
    """Bytes per second the guest writer writes into plugged memory (0: no writer)."""
    write_pattern: str = "random"
    hot_set: int = 64 * MiB


@dataclass(frozen=True)
class StepSpec:
    action: Action
    requested: tuple[tuple[str, int], ...] = ()
    device: str | None = None
    seconds: float = 0.0
    label: str = ""
    path: str | None = None
    transport: Transport = Transport.FILE
    downtime_limit: int = 300
    """live-migrate: milliseconds the guest may stop at the switchover (QMP downtime-limit)."""
    max_bandwidth: int = 0
    """live-migrate: bytes per second during the live rounds, 0 unlimited (QMP max-bandwidth)."""

    def describe(self) -> str:
        """The step's label, or a short description of what it does."""
        if self.label:
            return self.label
        if self.action is Action.RESIZE:
            return ", ".join(f"{d} -> {format_size(s)}" for d, s in self.requested)
        if self.action is Action.PAUSE:
            return f"pause {self.seconds:g}s"
        if self.action is Action.MIGRATE:
            return f"migrate ({self.transport.value})"
        if self.action is Action.LIVE_MIGRATE:
            resize = ", ".join(f"{d} -> {format_size(s)}" for d, s in self.requested)
            return "live-migrate" + (f" ({resize} meanwhile)" if resize else "")
        if self.device:
            return f"{self.action.value} {self.device}"
        return self.action.value


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: tuple[DeviceSpec, ...]
    consumers: tuple[ConsumerSpec, ...] = ()
    steps: tuple[StepSpec, ...] = ()
    boot_ram: int = 1 * GiB
    boot_backing: Backing = Backing.ANONYMOUS
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    description: str = ""
    source: str = "<scenario>"

    def device(self, id: str) -> DeviceSpec:
        """The device spec ``id``; KeyError if none."""
        for d in self.devices:
            if d.id == id:
                return d
        raise KeyError(id)
