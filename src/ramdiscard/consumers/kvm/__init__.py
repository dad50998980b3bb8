"""Raw KVM ioctls for memory slots and guest_memfd; see :mod:`ramdiscard.consumers.kvm.ioctl`."""

from __future__ import annotations

from ramdiscard.consumers.kvm.ioctl import (
    GUEST_MEMFD_FLAG_INIT_SHARED,
    GUEST_MEMFD_FLAG_MMAP,
    KVM_CAP_GUEST_MEMFD,
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_USER_MEMORY2,
    KVM_CAP_VM_TYPES,
    KVM_MEM_GUEST_MEMFD,
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    KVM_X86_DEFAULT_VM,
    KVM_X86_SW_PROTECTED_VM,
    GuestMemfdProbe,
    Kvm,
    KvmVm,
    guest_memfd_allocate,
    guest_memfd_punch_hole,
)
from ramdiscard.consumers.kvm.memslots import KvmMemslots, Memslot, MemslotsExhausted, ModelVm
from ramdiscard.interfaces import MemslotVm

__all__ = [
    "GUEST_MEMFD_FLAG_INIT_SHARED",
    "GUEST_MEMFD_FLAG_MMAP",
    "KVM_CAP_GUEST_MEMFD",
    "KVM_CAP_MEMORY_ATTRIBUTES",
    "KVM_CAP_NR_MEMSLOTS",
    "KVM_CAP_USER_MEMORY2",
    "KVM_CAP_VM_TYPES",
    "KVM_MEMORY_ATTRIBUTE_PRIVATE",
    "KVM_MEM_GUEST_MEMFD",
    "KVM_MEM_LOG_DIRTY_PAGES",
    "KVM_MEM_READONLY",
    "KVM_X86_DEFAULT_VM",
    "KVM_X86_SW_PROTECTED_VM",
    "GuestMemfdProbe",
    "Kvm",
    "KvmMemslots",
    "KvmVm",
    "Memslot",
    "MemslotVm",
    "MemslotsExhausted",
    "ModelVm",
    "guest_memfd_allocate",
    "guest_memfd_punch_hole",
]
