"""Choosing a KVM VM for guest_memfd, and measuring guest_memfd memory.

Rules:

* :func:`open_guest_memfd_vm` probes ``/dev/kvm`` (:meth:`ramdiscard.consumers.kvm.Kvm.probe_guest_memfd`)
  and creates a VM of the best type on which ``KVM_CREATE_GUEST_MEMFD`` works, preferring
  ``KVM_X86_SW_PROTECTED_VM`` (private memory without CoCo hardware), then the lowest
  working type. It raises :class:`GmemUnavailable` with the probe's reason when there is
  none, so callers can fall back to the plain model.
* :func:`supports_private_attribute` says whether ``KVM_SET_MEMORY_ATTRIBUTES`` can mark
  memory private on a VM (``KVM_CAP_MEMORY_ATTRIBUTES`` has the PRIVATE bit).
* guest_memfd allocation is visible neither through ``fstat`` (st_blocks stays 0) nor
  ``mincore``: its folios are unevictable page cache, so :func:`unevictable_bytes`
  (system-wide ``/proc/meminfo`` ``Unevictable``) is the measure.
"""

from __future__ import annotations

import errno

from ramdiscard.consumers.kvm import (
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_SW_PROTECTED_VM,
    Kvm,
    KvmVm,
)
from ramdiscard.errors import HostMemoryError

VM_TYPE_NAMES = {0: "KVM_X86_DEFAULT_VM", KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM"}


class GmemUnavailable(HostMemoryError):
    """KVM or guest_memfd is absent on this host; the message says what is missing."""


def open_guest_memfd_vm() -> KvmVm:
    """A new VM (owning its /dev/kvm fd) on which guest_memfd works; GmemUnavailable if none."""
    ok, why = Kvm.available()
    if not ok:
        raise GmemUnavailable(errno.ENODEV, why)
    kvm = Kvm()
    try:
        probe = kvm.probe_guest_memfd()
    finally:
        kvm.close()
    if not probe.supported:
        raise GmemUnavailable(errno.ENOTSUP, probe.reason)
    types = probe.vm_types
    vm_type = KVM_X86_SW_PROTECTED_VM if KVM_X86_SW_PROTECTED_VM in types else types[0]
    return KvmVm(None, vm_type)


def vm_type_name(vm: KvmVm) -> str:
    return VM_TYPE_NAMES.get(vm.machine_type, f"VM type {vm.machine_type}")


def supports_private_attribute(vm: KvmVm) -> bool:
    return bool(vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) & KVM_MEMORY_ATTRIBUTE_PRIVATE)


def unevictable_bytes() -> int:
    """System-wide unevictable memory (guest_memfd folios count here), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Unevictable:"):
                return int(line.split()[1]) * 1024
    raise HostMemoryError(errno.ENOENT, "/proc/meminfo has no Unevictable line")
