"""Raw KVM ioctls on this machine's /dev/kvm: memslots, errors, faults, guest_memfd."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator

import pytest

from ramdiscard import faults
from ramdiscard.consumers.kvm import (
    KVM_CAP_MEMORY_ATTRIBUTES,
    KVM_CAP_NR_MEMSLOTS,
    KVM_MEMORY_ATTRIBUTE_PRIVATE,
    Kvm,
    KvmVm,
    guest_memfd_allocate,
    guest_memfd_punch_hole,
)
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.units import MiB

KVM_OK, KVM_REASON = Kvm.available()
pytestmark = pytest.mark.skipif(not KVM_OK, reason=KVM_REASON)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def unevictable_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Unevictable:"):
                return int(line.split()[1])
    raise KeyError("Unevictable")


@pytest.fixture
def kvm() -> Iterator[Kvm]:
    with Kvm() as k:
        yield k


@pytest.fixture
def ram() -> Iterator[int]:
    m = mmap.mmap(-1, 8 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    yield ctypes.addressof(ctypes.c_char.from_buffer(m))
    m.close()


def test_api_version_and_memslot_limit(kvm: Kvm) -> None:
    assert kvm.api_version() == 12
    n = kvm.nr_memslots()
    assert n == kvm.check_extension(KVM_CAP_NR_MEMSLOTS) > 0
    with kvm.create_vm() as vm:
        assert vm.nr_memslots() == n


def test_add_overlap_delete_memslots(kvm: Kvm, ram: int) -> None:
    with kvm.create_vm() as vm:
        vm.set_user_memory_region(0, 0x100000000, 4 * MiB, ram)
        with pytest.raises(HostMemoryError) as info:
            vm.set_user_memory_region(1, 0x100000000 + 2 * MiB, 4 * MiB, ram + 4 * MiB)
        assert info.value.errno == errno.EEXIST
        assert "KVM_SET_USER_MEMORY_REGION(slot=1" in str(info.value)
        vm.delete_memory_region(0)
        vm.set_user_memory_region(1, 0x100000000 + 2 * MiB, 4 * MiB, ram + 4 * MiB)
        vm.set_user_memory_region(0, 0x100000000 - 2 * MiB, 2 * MiB, ram)  # adjacent is fine


def test_slot_beyond_the_limit_is_einval(kvm: Kvm, ram: int) -> None:
    with kvm.create_vm() as vm:
        last = vm.nr_memslots() - 1
        vm.set_user_memory_region(last, 0, 2 * MiB, ram)
        with pytest.raises(HostMemoryError) as info:
            vm.set_user_memory_region(last + 1, 4 * MiB, 2 * MiB, ram)
        assert info.value.errno == errno.EINVAL


def test_bad_arguments_change_nothing(kvm: Kvm, ram: int) -> None:
    with kvm.create_vm() as vm:
        with faults.counting() as log:
            for call in (
                lambda: vm.set_user_memory_region(0, 0x1001, 2 * MiB, ram),
                lambda: vm.set_user_memory_region(0, 0, 2 * MiB + 1, ram),
                lambda: vm.set_user_memory_region(-1, 0, 2 * MiB, ram),
                lambda: vm.create_guest_memfd(0),
            ):
                with pytest.raises(InvalidArgument):
                    call()
        assert log.counts[faults.Op.KVM_IOCTL] == 0


def test_injected_ioctl_fault(kvm: Kvm, ram: int) -> None:
    with kvm.create_vm() as vm:
        with faults.inject(faults.Op.KVM_IOCTL), pytest.raises(faults.InjectedFault):
            vm.set_user_memory_region(0, 0, 2 * MiB, ram)
        vm.set_user_memory_region(0, 0, 2 * MiB, ram)  # the slot was not created


def test_no_fd_leaks(ram: int) -> None:
    fds0 = fd_count()
    with KvmVm() as vm:
        vm.set_user_memory_region(0, 0, 2 * MiB, ram)
        with pytest.raises(HostMemoryError):
            vm.set_user_memory_region(1, 0, 2 * MiB, ram)
    with pytest.raises(HostMemoryError):
        KvmVm(machine_type=0x7FFF)
    assert fd_count() == fds0


def test_guest_memfd_slot_populate_and_punch(kvm: Kvm, ram: int) -> None:
    probe = kvm.probe_guest_memfd()
    if not probe.supported:
        pytest.skip(probe.reason)
    size = 64 * MiB
    with kvm.create_vm(probe.vm_types[0]) as vm:
        assert vm.supports_guest_memfd()
        gmem = vm.create_guest_memfd(size)
        try:
            vm.set_user_memory_region2(0, 0, size, ram, gmem, 0)
            # guest_memfd folios are unevictable: the counter shows allocation and punching.
            u0 = unevictable_kib()
            guest_memfd_allocate(gmem, 0, size)
            u1 = unevictable_kib()
            assert abs((u1 - u0) - size // 1024) < 4096
            guest_memfd_punch_hole(gmem, 0, size // 2)
            assert abs((u1 - unevictable_kib()) - size // 2048) < 4096
            with pytest.raises(HostMemoryError) as info:  # binding it twice overlaps
                vm.set_user_memory_region2(1, size, size, ram, gmem, 0)
            assert info.value.errno == errno.EINVAL
            vm.set_user_memory_region2(0, 0, 0, ram, gmem, 0)
        finally:
            os.close(gmem)


def test_memory_attributes(kvm: Kvm) -> None:
    probe = kvm.probe_guest_memfd()
    vm_type = probe.vm_types[0] if probe.vm_types else 0
    with kvm.create_vm(vm_type) as vm:
        if vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES) == 0:
            with pytest.raises(HostMemoryError) as info:
                vm.set_memory_attributes(0, 2 * MiB, KVM_MEMORY_ATTRIBUTE_PRIVATE)
            assert info.value.errno == errno.ENOTTY
            assert "KVM_SET_MEMORY_ATTRIBUTES" in str(info.value)
            pytest.skip(
                f"KVM_CAP_MEMORY_ATTRIBUTES=0 on VM type {vm_type} ({probe.reason}); "
                "ENOTTY verified, PRIVATE attribute not settable here"
            )
        vm.set_memory_attributes(0, 2 * MiB, KVM_MEMORY_ATTRIBUTE_PRIVATE)
        vm.set_memory_attributes(0, 2 * MiB, 0)
