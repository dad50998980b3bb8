"""Machine: a VM's guest memory on real host memory, built from a scenario.

Rules:

* :meth:`Machine.from_scenario` builds, in QEMU's order: a memory system of the machine's
  own (:attr:`Machine.system`: its topology lock, address space, RAM-block registry and
  DiscardPolicy are nobody else's, so machines in one process are independent), boot
  RAM and one RAM block per virtio-mem device (realized as
  :class:`~ramdiscard.providers.virtio_mem.VirtioMem`), all mapped into the address space
  "system memory" and listed in the system's RAM-block registry; then the consumers
  (:mod:`ramdiscard.machine.consumers`: vfio containers and KVM memslots listen to the
  address space, block DMA mappers follow the registry); then one
  :class:`~ramdiscard.guest.GuestDriver` per device (with the scenario's workload). Any
  failure releases everything built so far and raises.
* A consumer with ``coordinate-discards = false`` models a VMM that ignores the
  RamDiscardManager (life before it existed). It takes the full "discards disabled"
  count, which conflicts with virtio-mem's "coordinated discards required" on one
  DiscardPolicy (QEMU refuses that pairing); so such consumers get a second policy of
  their own (:attr:`Machine.uncoordinated_policy`), and the machine says so in
  :attr:`Machine.notes`.
* Snapshot, restore, migrate and dump (steps, or the methods of the same names) hold the
  machine lock throughout, so the guest sends nothing meanwhile. The guest model's state
  (drivers, workload) stands for what lives in guest memory: it travels with a snapshot
  or a migration. Each checks integrity afterwards (every populated byte equal, the
  workload's patterns intact, the dump's size) and raises MigrationError if not.
* The guest drives the devices only through request bytes. The host side changes only
  ``requested-size`` (:meth:`set_requested_size`) and resets; the drivers then converge,
  either synchronously (:meth:`run_guest`, :meth:`run_step`) or in a background thread
  (:meth:`start`) that reacts to config changes and to its retry timers.
* Every public method takes :attr:`Machine.lock` (an RLock); a QMP server or UI thread can
  call them concurrently with the background thread.
* :meth:`close` is idempotent and never raises: it stops the thread, detaches consumers
  (unpins, unmaps, deletes memslots), unmaps and unrealizes the devices, closes the RAM
  blocks and removes files the machine created. Host memory, pins and files do not
  outlive it.

Figures (:meth:`status`): ``plugged``/``requested`` sum over devices; ``guest_touched``
is what the workload wrote; ``resident`` is the VM's RAM held in memory (mincore);
``stale_pinned`` is memory the guest gave back that pins still hold; ``held`` =
``resident + stale_pinned`` is what the VM really costs the host; ``rss``, ``vm_pin``,
``vm_lck`` are this process's /proc counters.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ramdiscard import interrupts
from ramdiscard.consumers import blockdma
from ramdiscard.consumers.dma import DmaBackend, iouring_available, make_backend
from ramdiscard.consumers.kvm import Kvm, KvmMemslots, KvmVm, MemslotVm, ModelVm
from ramdiscard.consumers.vfio import VfioContainer
from ramdiscard.dump import DumpInfo, dump_guest_memory
from ramdiscard.errors import InvalidArgument
from ramdiscard.fileio import ExistingData, FileId, create_output, open_input, unlink_created
from ramdiscard.guest import DriverState, Exchange, GuestDriver, TouchWorkload
from ramdiscard.hostmem import RamBlock, proc_status
from ramdiscard.machine.consumers import Consumer, KvmConsumer, VfioConsumer
from ramdiscard.machine.scenario import (
    ADDRESS_LIMIT,
    Action,
    Backing,
    ConsumerSpec,
    ConsumerType,
    DmaBackendKind,
    KvmMode,
    Scenario,
    StepSpec,
    Transport,
)
from ramdiscard.memory.address_space import AddressSpace
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.memory.system import MemorySystem
from ramdiscard.migration import MigrationError, MigrationStats, load, migrate_to, receive_from, save
from ramdiscard.migration.checksum import default as default_checksum
from ramdiscard.migration.checksum import digest
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.ramblocks import registry_of
from ramdiscard.rdm.policy import DiscardPolicy, policy_of
from ramdiscard.units import format_size

log = logging.getLogger("ramdiscard.machine")

OnRequest = Callable[[str, Exchange], None]
"""Called as ``fn(device_id, exchange)`` after every guest request."""

Fingerprint = dict[str, list[tuple[int, int, int]]]
"""Per RAM block: (region offset, length, checksum) of every populated run."""


@dataclass
class StepResult:
    """What one step did: its requests, the final status, the wall time.

    ``machine`` is set when the step replaced the machine (``migrate``): the returned
    machine is the one to continue with, and the old one is closed. ``details`` holds the
    figures of snapshot/restore/migrate/dump steps."""

    index: int
    label: str
    seconds: float
    requests: int
    responses: dict[str, int]
    converged: bool
    status: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    machine: Machine | None = None


@dataclass
class _GuestState:
    """The guest model's state at a snapshot, and what the memory held then."""

    drivers: dict[str, GuestDriver]
    workload: TouchWorkload | None
    fingerprint: Fingerprint


class _Memory:
    """Guest-physical reads and writes onto the machine's RAM blocks."""

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, RamBlock]] = []

    def _find(self, gpa: int, length: int) -> tuple[RamBlock, int]:
        for start, size, block in self.ranges:
            if start <= gpa and gpa + length <= start + size:
                return block, gpa - start
        raise InvalidArgument(f"guest access [{gpa:#x}, +{length:#x}) is not RAM")

    def write(self, gpa: int, data: bytes) -> None:
        block, off = self._find(gpa, len(data))
        block.view[off : off + len(data)] = data

    def fill(self, gpa: int, size: int, byte: int) -> None:
        block, off = self._find(gpa, size)
        ctypes.memset(block.host_address + off, byte, size)

    def read(self, gpa: int, length: int) -> bytes:
        block, off = self._find(gpa, length)
        return bytes(block.view[off : off + length])


class Machine:
    """A machine built from a :class:`Scenario`; see the module rules. Use
    :meth:`from_scenario`, then :meth:`close` (or a ``with`` block)."""

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
        self.workload: TouchWorkload | None = None
        self.memory = _Memory()
        self._created_files: list[tuple[Path, FileId]] = []
        self._own_workdir: Path | None = None
        self._workdir = Path(workdir) if workdir is not None else None
        self._root = MemoryRegion.new_container("system", ADDRESS_LIMIT, system=self.system)
        self._mapped: list[MemoryRegion] = []
        self.space: AddressSpace | None = None
        self.boot: MemoryRegion | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Condition(self.lock)
        self._requests = 0
        self.on_request: OnRequest | None = None
        self._snapshots: dict[str, _GuestState] = {}
        self._last_snapshot: str | None = None
        self._own_files_dir: Path | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_scenario(
        cls,
        scenario: Scenario,
        *,
        workdir: str | Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Machine:
        """Build the machine. Raises InvalidArgument/RamDiscardError/OSError with a clear
        message when something cannot be built; nothing is left held then."""
        m = cls(scenario, workdir=workdir, clock=clock)
        try:
            m._build()
        except BaseException:
            m.close()
            raise
        return m

    def _build(self) -> None:
        sc = self.scenario
        if sc.boot_ram:
            block = RamBlock(sc.boot_ram, sc.boot_backing.value, name="pc.ram")
            self.blocks.append(block)
            self.boot = MemoryRegion.new_ram("pc.ram", block, system=self.system)
            self._root.add_subregion(0, self.boot)
            self._mapped.append(self.boot)
            self.memory.ranges.append((0, sc.boot_ram, block))
        for d in sc.devices:
            path: Path | None = None
            if d.backing is Backing.FILE:
                path = Path(d.path) if d.path else self._work() / f"{d.id}.mem"
            # Held off so a signal cannot fall between creating a file and recording it.
            with interrupts.deferred():
                try:
                    block = RamBlock(
                        d.size, d.backing.value, path=path,
                        thp=d.thp if d.backing is Backing.ANONYMOUS else True,
                        name=f"{d.id}-mem", allow_existing_data=d.overwrite,
                    )  # fmt: skip
                except ExistingData as exc:
                    raise ExistingData(f"{exc} (set overwrite = true on device {d.id!r} to use it)") from None
                self.blocks.append(block)
                if path is not None and block.created and block.file_id is not None:
                    self._created_files.append((path, block.file_id))
            mr = MemoryRegion.new_ram(f"{d.id}-mem", block, system=self.system)
            assert d.addr is not None
            dev = VirtioMem(
                mr, addr=d.addr, id=d.id, block_size=d.block_size, requested_size=d.requested_size,
                prealloc=d.prealloc, dynamic_memslots=d.dynamic_memslots,
                memslot_limit=d.memslot_limit or None, policy=self.policy,
            )  # fmt: skip
            self.devices[d.id] = dev
            self._root.add_subregion(d.addr, dev.device_region)
            self._mapped.append(dev.device_region)
            self.memory.ranges.append((d.addr, d.size, block))
        self.space = AddressSpace("system memory", self._root)
        kvm_used = any(c.type is ConsumerType.KVM for c in sc.consumers)
        for c in sc.consumers:
            consumer = self._make_consumer(c, kvm_used)
            self.consumers.append(consumer)
            consumer.attach(self.space)
        if sc.workload.touch > 0:
            self.workload = TouchWorkload(self.memory, touch=sc.workload.touch)
        for dev_id, dev in self.devices.items():
            self._new_driver(dev_id)
            dev.add_config_change_notifier(self._config_changed)

    def _work(self) -> Path:
        if self._workdir is None:
            base = "/dev/shm" if os.path.isdir("/dev/shm") else None
            with interrupts.deferred():
                self._own_workdir = Path(tempfile.mkdtemp(prefix=f"ramdiscard-{os.getpid()}-", dir=base))
            self._workdir = self._own_workdir
        self._workdir.mkdir(parents=True, exist_ok=True)
        return self._workdir

    def _make_consumer(self, c: ConsumerSpec, kvm_used: bool) -> Consumer:
        policy = self.policy
        if not c.coordinate_discards and c.type is not ConsumerType.KVM:
            policy = self.uncoordinated_policy
            self.notes.append(
                f"{c.id}: coordinate-discards = false: it ignores the RamDiscardManager, as a VMM did "
                "before it existed, and holds a discard policy of its own (on a shared policy its "
                "'discards disabled' would conflict with virtio-mem, as QEMU refuses that pairing)"
            )
        if c.type is ConsumerType.VFIO:
            backend = self._make_backend(c)
            try:
                container = VfioContainer(
                    backend, max_mappings=c.dma_limit, coordinate_discards=c.coordinate_discards,
                    policy=policy, max_memslots=32764 if kvm_used else 512,
                    dma_limit_check=c.dma_limit_check,
                )  # fmt: skip
            except BaseException:
                backend.close()
                raise
            return VfioConsumer(c.id, backend, container)
        if c.type is ConsumerType.BLOCKDMA:
            return blockdma.make_consumer(
                c.id, backend=self._backend_kind(c), coordinate_discards=c.coordinate_discards,
                policy=policy, registry=self.registry, iova_base=c.iova_base, iova_size=c.iova_size,
                iova_align=c.iova_align,
            )  # fmt: skip
        vm: MemslotVm | None = None
        if c.mode is not KvmMode.MODEL:
            ok, why = Kvm.available()
            if ok:
                vm = KvmVm()
            elif c.mode is KvmMode.KVM:
                raise InvalidArgument(f"consumer {c.id}: /dev/kvm unusable: {why}")
            else:
                self.notes.append(f"{c.id}: /dev/kvm unusable ({why}); memslots are counted, not created")
        real = vm is not None
        if vm is None:
            vm = ModelVm()
        try:
            memslots = KvmMemslots(vm)
        except BaseException:
            vm.close()
            raise
        return KvmConsumer(c.id, memslots, real_kvm=real)

    def _backend_kind(self, c: ConsumerSpec) -> str:
        """The DMA backend name for ``c``: auto becomes io_uring, or mlock with a note."""
        kind = c.backend
        if kind in (DmaBackendKind.AUTO, DmaBackendKind.IO_URING):
            ok, why = iouring_available()
            if ok:
                return DmaBackendKind.IO_URING.value
            if kind is DmaBackendKind.IO_URING:
                raise InvalidArgument(f"consumer {c.id}: io_uring unusable: {why}")
            self.notes.append(f"{c.id}: io_uring unusable ({why}); pinning with mlock (VmLck, not VmPin)")
            return DmaBackendKind.MLOCK.value
        return kind.value

    def _make_backend(self, c: ConsumerSpec) -> DmaBackend:
        return make_backend(self._backend_kind(c))

    def _new_driver(self, dev_id: str) -> GuestDriver:
        drv = GuestDriver(self.devices[dev_id], clock=self.clock, workload=self.workload)
        self.drivers[dev_id] = drv
        return drv

    def _config_changed(self, dev: VirtioMem) -> None:
        drv = self.drivers.get(dev.id)
        if drv is not None:
            drv.config_changed()
        self._wake.set()

    # -- host-side control ----------------------------------------------------------------

    def device_ids(self) -> list[str]:
        return list(self.devices)

    def device(self, dev_id: str) -> VirtioMem:
        """The device ``dev_id``; KeyError naming the known ids otherwise."""
        try:
            return self.devices[dev_id]
        except KeyError:
            raise KeyError(f"no virtio-mem device {dev_id!r} (devices: {', '.join(self.devices)})") from None

    def get_requested_size(self, dev_id: str) -> int:
        with self.lock:
            return self.device(dev_id).requested_size

    def set_requested_size(self, dev_id: str, size: int) -> None:
        """Set ``requested-size``; the guest reacts (now in thread mode, else on the next
        :meth:`run_guest`). Raises KeyError / InvalidArgument (nothing changed)."""
        with self.lock:
            self._check_open()
            self.device(dev_id).requested_size = size
        self._wake.set()

    def sizes(self, dev_id: str) -> dict[str, int]:
        """block-size, region size, usable, plugged ("size") and requested sizes, in bytes."""
        with self.lock:
            d = self.device(dev_id)
            return {
                "block-size": d.block_size,
                "addr": d.addr,
                "region-size": d.region_size,
                "usable-region-size": d.usable_region_size,
                "size": d.plugged_size,
                "requested-size": d.requested_size,
            }

    def system_reset(self) -> None:
        """Full system reset: every device unplugs everything; the guest reboots (fresh
        drivers that start over towards the requested sizes)."""
        with self.lock:
            self._check_open()
            for dev_id, dev in self.devices.items():
                dev.system_reset()
                self._new_driver(dev_id)
            if self.workload is not None:
                self.workload.unplugged_all()
        self._wake.set()

    def unplug_all(self, dev_id: str | None = None) -> None:
        """The guest driver (re)starts and sends UNPLUG_ALL first (models a driver reload)."""
        with self.lock:
            self._check_open()
            for i in [dev_id] if dev_id else list(self.devices):
                self.device(i)
                self.drivers[i].request_unplug_all()
        self._wake.set()

    # -- running the guest ----------------------------------------------------------------

    def run_guest(self, max_requests: int = 1_000_000, on_request: OnRequest | None = None) -> list[Exchange]:
        """Let every guest driver work until none has anything to send now (converged,
        waiting on its retry timer, or broken). Returns the exchanges, in order."""
        out: list[Exchange] = []
        cb = on_request or self.on_request
        progress = True
        while progress and len(out) < max_requests:
            progress = False
            for dev_id in list(self.devices):
                with self.lock:
                    self._check_open()
                    ex = self.drivers[dev_id].step()
                    if ex is not None:
                        self._requests += 1
                if ex is None:
                    continue
                progress = True
                out.append(ex)
                if cb is not None:
                    cb(dev_id, ex)
        return out

    def converged(self) -> bool:
        """True when no driver has work it could do now."""
        with self.lock:
            return all(d.state is not DriverState.WORKING for d in self.drivers.values())

    def run_step(self, step: StepSpec, index: int = 0, on_request: OnRequest | None = None) -> StepResult:
        """Apply one scenario step and let the guest react; returns its figures.

        A ``migrate`` step returns the destination in :attr:`StepResult.machine` and closes
        this machine; the guest then runs on the destination."""
        t0 = time.monotonic()
        notes: list[str] = []
        details: dict[str, Any] = {}
        target = self
        if step.action is Action.RESIZE:
            for dev_id, size in step.requested:
                self.set_requested_size(dev_id, size)
        elif step.action is Action.UNPLUG_ALL:
            self.unplug_all(step.device)
        elif step.action is Action.SYSTEM_RESET:
            self.system_reset()
        elif step.action is Action.PAUSE:
            time.sleep(step.seconds)
        elif step.action is Action.SNAPSHOT:
            details = self.snapshot(step.path)
            notes.append(
                f"snapshot {details['path']}: {format_size(details['page_bytes'])} of populated memory "
                f"in {details['seconds']:.2f} s, file holds {format_size(details['file_allocated'])}"
                + ("" if step.path else "; removed at exit (set path to keep it)")
            )
        elif step.action is Action.RESTORE:
            details = self.restore(step.path)
            notes.append(
                f"restored {details['path']}: {format_size(details['page_bytes'])} loaded in "
                f"{details['seconds']:.2f} s; every populated byte and the guest's patterns check out"
            )
        elif step.action is Action.MIGRATE:
            target, details = self.migrate(step.transport, step.path)
            notes.append(
                f"migrated over {details['transport']}: {format_size(details['page_bytes'])} of populated "
                f"memory ({format_size(details['stream_bytes'])} streamed) in {details['seconds']:.2f} s "
                "to a fresh machine; every populated byte and the guest's patterns check out"
            )
        elif step.action is Action.DUMP:
            details = self.dump(
                step.path or str(self._files_dir() / f"{self.scenario.name}-step{index}.elf"),
                durable=bool(step.path),
            )
            notes.append(
                f"dump {details['path']}: {details['segments']} PT_LOAD segments, "
                f"{format_size(details['bytes'])} (boot RAM + plugged memory only)"
                + ("" if step.path else "; removed at exit (set path to keep it)")
            )
        exchanges: list[Exchange] = []
        if target._thread is None:
            exchanges = target.run_guest(on_request=on_request)
        else:
            target.wait_converged()
        responses: dict[str, int] = {}
        for ex in exchanges:
            name = getattr(ex.response, "name", str(ex.response)).lower()
            responses[name] = responses.get(name, 0) + 1
        with target.lock:
            for dev_id, drv in target.drivers.items():
                if drv.state is DriverState.WAITING:
                    notes.append(f"{dev_id}: guest driver waits for its retry timer (device answered BUSY)")
                elif drv.state is DriverState.BROKEN:
                    notes.append(f"{dev_id}: guest driver broken: {drv.broken_reason}")
                elif drv.plugged_size != target.devices[dev_id].requested_size:
                    notes.append(
                        f"{dev_id}: guest stopped at {drv.plugged_size:#x} "
                        f"of {target.devices[dev_id].requested_size:#x}"
                    )
        status = target.status()
        return StepResult(
            index=index,
            label=step.describe(),
            seconds=time.monotonic() - t0,
            requests=len(exchanges),
            responses=responses,
            converged=target.converged(),
            status=status,
            notes=notes,
            details=details,
            machine=target if target is not self else None,
        )

    # -- snapshot, restore, migrate, dump -------------------------------------------------

    def fingerprint(self) -> Fingerprint:
        """Checksums of every populated run of every RAM block (boot RAM whole, device
        RAM per plugged run). Reads memory in place; never touches discarded memory."""
        algo = default_checksum()
        out: Fingerprint = {}
        with self.lock:
            if self.boot is not None and self.boot.ram is not None:
                view = self.blocks[0].view
                out["pc.ram"] = [(0, len(view), digest(algo, view))]
            for dev_id, dev in self.devices.items():
                ram = dev.region.ram
                assert isinstance(ram, RamBlock)
                out[dev_id] = [(o, n, digest(algo, ram.view[o : o + n])) for o, n in dev.plugged_ranges()]
        return out

    def _guest_state(self, drivers: dict[str, GuestDriver], workload: TouchWorkload | None) -> _GuestState:
        memory = self.memory
        clones = {i: d.clone(self.devices[i], workload=None) for i, d in drivers.items()}
        wl = workload.clone(memory) if workload is not None else None
        for d in clones.values():
            d.workload = wl
        return _GuestState(clones, wl, {})

    def _adopt_guest(self, state: _GuestState) -> None:
        """Continue with a copy of ``state``'s guest (drivers and workload) on this machine."""
        adopted = self._guest_state(state.drivers, state.workload)
        self.drivers = adopted.drivers
        self.workload = adopted.workload

    def _check_integrity(self, want: Fingerprint, what: str) -> None:
        got = self.fingerprint()
        if got != want:
            bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
            raise MigrationError(f"{what}: memory differs from the source in {', '.join(bad)}")
        if self.workload is not None:
            broken = self.workload.verify()
            if broken:
                raise MigrationError(f"{what}: {len(broken)} chunk(s) the guest wrote lost their content")

    def _stats(self, stats: MigrationStats) -> dict[str, Any]:
        return {
            "page_bytes": stats.page_bytes,
            "page_sections": stats.page_sections,
            "stream_bytes": stats.stream_bytes,
            "seconds": round(stats.seconds, 4),
        }

    def snapshot(self, path: str | None = None) -> dict[str, Any]:
        """Save the machine (RAM of every block, device states) to ``path`` (default: a
        file in the machine's snapshot directory, removed at close) as a sparse snapshot;
        remember the guest model's state with it. Returns the figures."""
        with self.lock:
            self._check_open()
            target = Path(path) if path else self._files_dir() / f"{self.scenario.name}.snap"
            state = self._guest_state(self.drivers, self.workload)
            state.fingerprint = self.fingerprint()
            with create_output(target, "snapshot file", durable=bool(path)) as f:
                stats = save(self.space_or_fail(), list(self.devices.values()), f)
            self._snapshots[str(target)] = state
            self._last_snapshot = str(target)
            st = os.stat(target)
            return {"path": str(target), **self._stats(stats), "file_size": st.st_size,
                    "file_allocated": st.st_blocks * 512}  # fmt: skip

    def restore(self, path: str | None = None) -> dict[str, Any]:
        """Load a snapshot into this machine, as QEMU's loadvm: every device is reset to
        all-unplugged, then RAM and device states are loaded (consumers follow through the
        usual populate notifications) and the guest continues from the snapshot.

        Without ``path``, the latest :meth:`snapshot`. A snapshot file this machine did
        not write restores memory and devices; the guest model then restarts (a fresh
        driver that finds memory plugged and sends UNPLUG_ALL first). Raises
        MigrationError (bad file, integrity) or InvalidArgument (no snapshot)."""
        with self.lock:
            self._check_open()
            key = path if path is not None else self._last_snapshot
            if key is None:
                raise InvalidArgument("restore: no snapshot taken and no path given")
            state = self._snapshots.get(str(Path(key)))
            for dev in self.devices.values():
                dev.system_reset()
            with open_input(key, "snapshot file") as f:
                stats = load(self.space_or_fail(), list(self.devices.values()), f)
            if state is not None:
                self._adopt_guest(state)
                self._check_integrity(state.fingerprint, "restore")
            else:
                for dev_id in self.devices:
                    self._new_driver(dev_id)
                if self.workload is not None:
                    self.workload.unplugged_all()
        self._wake.set()
        return {"path": key, **self._stats(stats)}

    def migrate(
        self, transport: Transport | str = Transport.FILE, path: str | None = None
    ) -> tuple[Machine, dict[str, Any]]:
        """Migrate to a fresh machine built from the same scenario, through a file (``path``,
        default a temporary one) or a TCP connection on the loopback; check integrity there
        and continue with the destination (guest model included). On success this machine
        is closed and the destination returned (its guest thread runs if this one's did);
        on failure the destination is closed and this machine is unchanged."""
        transport = Transport(transport)
        with self.lock:
            self._check_open()
            state = self._guest_state(self.drivers, self.workload)
            state.fingerprint = self.fingerprint()
            was_running = self._thread is not None
            dest = Machine.from_scenario(self.scenario, clock=self.clock)
            try:
                if transport is Transport.FILE:
                    target = Path(path) if path else self._files_dir() / f"{self.scenario.name}-migration.bin"
                    with create_output(target, "migration file", durable=bool(path)) as f:
                        save(self.space_or_fail(), list(self.devices.values()), f)
                        f.seek(0)
                        stats = load(dest.space_or_fail(), list(dest.devices.values()), f)
                    if not path:
                        with contextlib.suppress(OSError):
                            target.unlink()
                else:
                    stats = self._migrate_tcp(dest)
                dest._adopt_guest(state)
                dest._check_integrity(state.fingerprint, "migrate")
            except BaseException:
                dest.close()
                raise
            dest.on_request = self.on_request
            dest._requests = self._requests
        self.close()
        if was_running:
            dest.start()
        return dest, {"transport": transport.value, **self._stats(stats)}

    def _migrate_tcp(self, dest: Machine) -> MigrationStats:
        import socket

        result: dict[str, Any] = {}
        with socket.create_server(("127.0.0.1", 0)) as ls:
            port = ls.getsockname()[1]

            def receive() -> None:
                try:
                    result["stats"] = receive_from(
                        ls, dest.space_or_fail(), list(dest.devices.values()), accept_timeout=30
                    )
                except BaseException as exc:  # re-raised in the caller's thread
                    result["error"] = exc

            t = threading.Thread(target=receive, name="ramdiscard-migrate-receive", daemon=True)
            t.start()
            try:
                migrate_to("127.0.0.1", port, self.space_or_fail(), list(self.devices.values()))
            finally:
                t.join()
        if "error" in result:
            raise result["error"]
        stats: MigrationStats = result["stats"]
        return stats

    def dump(self, path: str, *, durable: bool = True) -> dict[str, Any]:
        """Write an ELF core of the populated guest memory to ``path``
        (:func:`ramdiscard.dump.dump_guest_memory`: mode 0600, a non-regular path or one
        backing guest memory refused); check it holds exactly boot RAM plus plugged
        memory. Returns the figures."""
        with self.lock:
            self._check_open()
            info: DumpInfo = dump_guest_memory(self.space_or_fail(), path, durable=durable)
            want = self.scenario.boot_ram + sum(d.plugged_size for d in self.devices.values())
            if info.bytes != want:
                raise MigrationError(f"dump: {info.bytes:#x} bytes dumped, {want:#x} populated")
            return {
                "path": info.path,
                "segments": info.segments,
                "bytes": info.bytes,
                "file_size": info.file_size,
            }

    def space_or_fail(self) -> AddressSpace:
        if self.space is None:
            raise InvalidArgument("machine has no address space (closed or not built)")
        return self.space

    def _files_dir(self) -> Path:
        """Where default snapshot, migration and dump files go: a temporary directory on
        disk (not /dev/shm: a snapshot holds as much as the guest has populated), removed
        at close."""
        if self._own_files_dir is None:
            with interrupts.deferred():
                self._own_files_dir = Path(tempfile.mkdtemp(prefix=f"ramdiscard-files-{os.getpid()}-"))
        return self._own_files_dir

    # -- background mode ------------------------------------------------------------------

    def start(self) -> None:
        """Run the guest drivers in a daemon thread that reacts to requested-size changes
        and retry timers until :meth:`stop` or :meth:`close`."""
        with self.lock:
            self._check_open()
            if self._thread is not None:
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="ramdiscard-guest", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        t = self._thread
        if t is None:
            return
        self._stop.set()
        self._wake.set()
        t.join()
        self._thread = None

    def wait_converged(self, timeout: float | None = None) -> bool:
        """Block until the drivers have nothing to do now (thread mode). True if so."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while not self.converged():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_guest(max_requests=256)
            except Exception:
                log.exception("guest driver thread stopped")
                return
            with self._idle:
                if self.converged():
                    self._idle.notify_all()
                    timers = [d.retry_at for d in self.drivers.values() if d.retry_at is not None]
                else:
                    continue
            wait = None if not timers else max(0.0, min(timers) - self.clock())
            self._wake.wait(min(wait, 1.0) if wait is not None else 1.0)
            self._wake.clear()

    # -- figures --------------------------------------------------------------------------

    def sample(self) -> dict[str, int]:
        """Cheap figures for time series: plugged, rss, vm_pin, vm_lck, dma mappings."""
        ps = proc_status()
        with self.lock:
            return {
                "plugged": sum(d.plugged_size for d in self.devices.values()),
                "rss": ps.vm_rss,
                "vm_pin": ps.vm_pin,
                "vm_lck": ps.vm_lck,
                "dma_mappings": sum(
                    c.container.mapping_count for c in self.consumers if isinstance(c, VfioConsumer)
                ),
            }

    def status(self) -> dict[str, Any]:
        """All figures (bytes and counts); see the module docstring."""
        ps = proc_status()
        with self.lock:
            resident = sum(b.resident_bytes() for b in self.blocks if not b.closed)
            vfio = [c for c in self.consumers if isinstance(c, VfioConsumer)]
            kvm = [c for c in self.consumers if isinstance(c, KvmConsumer)]
            stale = sum(c.stale_pinned_bytes() for c in self.consumers)
            devices = {}
            for dev_id, d in self.devices.items():
                drv = self.drivers[dev_id]
                devices[dev_id] = {
                    **self.sizes(dev_id),
                    "memslots": d.nb_memslots,
                    "mapped-memslots": d.mapped_memslots,
                    "driver": drv.state.value,
                    "driver-plugged": drv.plugged_size,
                    "requests": len(drv.log),
                    "metrics": d.metrics.as_dict(),
                }
            return {
                "plugged": sum(d.plugged_size for d in self.devices.values()),
                "requested": sum(d.requested_size for d in self.devices.values()),
                "region_size": sum(d.region_size for d in self.devices.values()),
                "boot_ram": self.scenario.boot_ram,
                "guest_touched": self.workload.touched_bytes if self.workload else 0,
                "resident": resident,
                "stale_pinned": stale,
                "held": resident + stale,
                "rss": ps.vm_rss,
                "vm_pin": ps.vm_pin,
                "vm_lck": ps.vm_lck,
                "pinned": sum(c.pinned_bytes for c in self.consumers),
                "dma_mappings": sum(c.container.mapping_count for c in vfio),
                "memslots": sum(c.memslots.slot_count for c in kvm) if kvm else None,
                "requests": self._requests,
                "devices": devices,
                "consumers": [c.status() for c in self.consumers],
            }

    # -- teardown -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidArgument("machine is closed")

    def close(self) -> None:
        """Release everything (see the module rules). Idempotent; raises nothing of its
        own. SIGINT/SIGTERM cannot interrupt it (:func:`ramdiscard.interrupts.deferred`):
        one arriving meanwhile raises KeyboardInterrupt once everything is released."""
        if self._closed:
            return
        with interrupts.deferred():
            self._close()

    def _close(self) -> None:
        self._closed = True
        with contextlib.suppress(Exception):
            self.stop()
        with self.lock:
            for c in reversed(self.consumers):
                with contextlib.suppress(Exception):
                    c.close()
            self.consumers.clear()
            for mr in reversed(self._mapped):
                try:
                    self._root.del_subregion(mr)
                except Exception:
                    log.exception("unmapping %s failed", mr.name)
            self._mapped.clear()
            for dev in self.devices.values():
                try:
                    dev.unrealize()
                except Exception:
                    log.exception("unrealizing %s failed", dev.id)
            if self.space is not None:
                self.space.destroy()
            # Files are removed while their blocks still hold the lock on them, and only if
            # the path still names the file this machine created.
            for p, fid in self._created_files:
                unlink_created(p, fid)
            for b in self.blocks:
                with contextlib.suppress(Exception):
                    b.close()
            if self._own_workdir is not None:
                shutil.rmtree(self._own_workdir, ignore_errors=True)
            if self._own_files_dir is not None:
                shutil.rmtree(self._own_files_dir, ignore_errors=True)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
