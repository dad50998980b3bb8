"""Building a machine from its scenario, in QEMU's order.

Rules:

* :func:`build` fills a fresh :class:`~ramdiscard.machine.Machine` in order: boot RAM,
  then one RAM block per virtio-mem device (realized as
  :class:`~ramdiscard.providers.virtio_mem.VirtioMem` on the machine's discard policy),
  all mapped into the machine's root container and listed in its RAM-block registry;
  then the address space "system memory"; then the consumers (:func:`make_consumer`,
  attached to the address space in scenario order); then the workload, one
  :class:`~ramdiscard.guest.GuestDriver` per device, and the writer thread (not started).
* Everything built is recorded on the machine as soon as it exists (blocks, mapped
  regions, created files, devices, consumers), so when :func:`build` raises,
  :meth:`Machine.close <ramdiscard.machine.Machine.close>` releases exactly what was built.
* A consumer with ``coordinate-discards = false`` (vfio, blockdma) gets the machine's
  second policy (:attr:`Machine.uncoordinated_policy`): its "discards disabled" would
  conflict with virtio-mem's "coordinated discards required" on one policy, as QEMU
  refuses that pairing. The machine says so in :attr:`Machine.notes`, as it does when
  io_uring or /dev/kvm is unusable and ``auto`` falls back (mlock; counted memslots).
  Asking explicitly for ``io_uring`` or ``kvm`` when unusable raises InvalidArgument.
"""

from __future__ import annotations

from pathlib import Path

from ramdiscard import interrupts
from ramdiscard.consumers import blockdma
from ramdiscard.consumers.dma import iouring_available, make_backend
from ramdiscard.consumers.kvm import Kvm, KvmMemslots, KvmVm, MemslotVm, ModelVm
from ramdiscard.consumers.vfio import VfioContainer
from ramdiscard.errors import InvalidArgument
from ramdiscard.fileio import ExistingData
from ramdiscard.guest import TouchWorkload
from ramdiscard.guest.writer import DeviceTarget, GuestWriter
from ramdiscard.hostmem import RamBlock
from ramdiscard.machine.consumers import Consumer, KvmConsumer, VfioConsumer
from ramdiscard.machine.parts import MachineParts
from ramdiscard.machine.scenario import (
    Backing,
    ConsumerSpec,
    ConsumerType,
    DeviceSpec,
    DmaBackendKind,
    KvmMode,
)
from ramdiscard.memory.address_space import AddressSpace
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem


def build(m: MachineParts) -> None:
    """Build ``m`` from ``m.scenario``; see the module rules."""
    sc = m.scenario
    if sc.boot_ram:
        block = RamBlock(sc.boot_ram, sc.boot_backing.value, name="pc.ram")
        m.blocks.append(block)
        m.boot = MemoryRegion.new_ram("pc.ram", block, system=m.system)
        m.root.add_subregion(0, m.boot)
        m.mapped.append(m.boot)
        m.memory.ranges.append((0, sc.boot_ram, block))
    for d in sc.devices:
        block = _device_ram(m, d)
        mr = MemoryRegion.new_ram(f"{d.id}-mem", block, system=m.system)
        assert d.addr is not None
        dev = VirtioMem(
            mr, addr=d.addr, id=d.id, block_size=d.block_size, requested_size=d.requested_size,
            prealloc=d.prealloc, dynamic_memslots=d.dynamic_memslots,
            memslot_limit=d.memslot_limit or None, policy=m.policy,
        )  # fmt: skip
        m.devices[d.id] = dev
        m.root.add_subregion(d.addr, dev.device_region)
        m.mapped.append(dev.device_region)
        m.memory.ranges.append((d.addr, d.size, block))
    m.space = AddressSpace("system memory", m.root)
    kvm_used = any(c.type is ConsumerType.KVM for c in sc.consumers)
    for c in sc.consumers:
        consumer = make_consumer(m, c, kvm_used)
        m.consumers.append(consumer)
        consumer.attach(m.space)
    if sc.workload.touch > 0:
        m.workload = TouchWorkload(m.memory, touch=sc.workload.touch)
    for dev_id, dev in m.devices.items():
        m.new_driver(dev_id)
        dev.add_config_change_notifier(m.config_changed)
    if sc.workload.write_rate > 0:
        targets = [DeviceTarget(dev, dev.region.ram) for dev in m.devices.values()]
        m.writer = GuestWriter(
            targets, m.lock, rate=sc.workload.write_rate,
            pattern=sc.workload.write_pattern, hot_set=sc.workload.hot_set,
        )  # fmt: skip


def _device_ram(m: MachineParts, d: DeviceSpec) -> RamBlock:
    """The RAM block of device ``d``, recorded on ``m`` (and its file, if created)."""
    path: Path | None = None
    if d.backing is Backing.FILE:
        path = Path(d.path) if d.path else m.files.workdir() / f"{d.id}.mem"
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
        m.blocks.append(block)
        if path is not None and block.created and block.file_id is not None:
            m.files.record_created(path, block.file_id)
    return block


def make_consumer(m: MachineParts, c: ConsumerSpec, kvm_used: bool) -> Consumer:
    """The consumer ``c`` (not attached); ``kvm_used`` says whether the machine has KVM
    memslots (it raises a vfio container's memslot budget)."""
    policy = m.policy
    if not c.coordinate_discards and c.type is not ConsumerType.KVM:
        policy = m.uncoordinated_policy
        m.notes.append(
            f"{c.id}: coordinate-discards = false: it ignores the RamDiscardManager, as a VMM did "
            "before it existed, and holds a discard policy of its own (on a shared policy its "
            "'discards disabled' would conflict with virtio-mem, as QEMU refuses that pairing)"
        )
    if c.type is ConsumerType.VFIO:
        backend = make_backend(backend_kind(m, c))
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
            c.id, backend=backend_kind(m, c), coordinate_discards=c.coordinate_discards,
            policy=policy, registry=m.registry, iova_base=c.iova_base, iova_size=c.iova_size,
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
            m.notes.append(f"{c.id}: /dev/kvm unusable ({why}); memslots are counted, not created")
    real = vm is not None
    if vm is None:
        vm = ModelVm()
    try:
        memslots = KvmMemslots(vm)
    except BaseException:
        vm.close()
        raise
    return KvmConsumer(c.id, memslots, real_kvm=real)


def backend_kind(m: MachineParts, c: ConsumerSpec) -> str:
    """The DMA backend name for ``c``: auto becomes io_uring, or mlock with a note on ``m``."""
    kind = c.backend
    if kind in (DmaBackendKind.AUTO, DmaBackendKind.IO_URING):
        ok, why = iouring_available()
        if ok:
            return DmaBackendKind.IO_URING.value
        if kind is DmaBackendKind.IO_URING:
            raise InvalidArgument(f"consumer {c.id}: io_uring unusable: {why}")
        m.notes.append(f"{c.id}: io_uring unusable ({why}); pinning with mlock (VmLck, not VmPin)")
        return DmaBackendKind.MLOCK.value
    return kind.value
