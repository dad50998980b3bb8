"""Just enough raw KVM for guest_memfd: a VM, a guest_memfd, a memslot bound to it, memory
attributes, and hole punching.

Rules:

* :meth:`GmemVm.open` probes ``/dev/kvm`` and picks the first VM type that both exists
  (``KVM_CAP_VM_TYPES``) and offers ``KVM_CAP_GUEST_MEMFD``, preferring
  ``KVM_X86_SW_PROTECTED_VM`` (private memory without real CoCo hardware), then the default
  type (which on 6.8+ kernels also takes guest_memfd memslots). It raises
  :class:`GmemUnavailable` with the reason when none works, so callers can fall back.
* ``KVM_SET_MEMORY_ATTRIBUTES`` is used only where ``KVM_CAP_MEMORY_ATTRIBUTES`` reports the
  PRIVATE attribute for that VM; :attr:`GmemVm.supports_private_attribute` says which.
* Every ioctl and fallocate passes :func:`ramdiscard.faults.checkpoint` first and raises
  :class:`~ramdiscard.errors.HostMemoryError` with the errno on failure.
* guest_memfd allocation is not visible through ``fstat`` (st_blocks stays 0) nor mincore;
  its folios are unevictable page cache, so :func:`unevictable_bytes` (system-wide
  ``/proc/meminfo`` ``Unevictable``) is the measure.

This module is private to the attributes provider until ``ramdiscard.kvm`` (branch dma)
lands; the calls are the same ones, so switching is mechanical.
"""

from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass, field

from ramdiscard.errors import HostMemoryError
from ramdiscard.faults import Op, checkpoint

_KVMIO = 0xAE
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03

KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
VM_TYPE_NAMES = {KVM_X86_DEFAULT_VM: "KVM_X86_DEFAULT_VM", KVM_X86_SW_PROTECTED_VM: "KVM_X86_SW_PROTECTED_VM"}

KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_REGION2 = struct.Struct("=IIQQQQII14Q")
_ATTRS = struct.Struct("=QQQQ")
_CREATE_GMEM = struct.Struct("=QQ6Q")


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_KVMIO << 8) | nr


KVM_SET_USER_MEMORY_REGION2 = _iow(0x49, _REGION2.size)
KVM_SET_MEMORY_ATTRIBUTES = _iow(0xD2, _ATTRS.size)
KVM_CREATE_GUEST_MEMFD = _iowr(0xD4, _CREATE_GMEM.size)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.fallocate.restype = ctypes.c_int


class GmemUnavailable(HostMemoryError):
    """KVM or guest_memfd is absent on this host; the message says what is missing."""


def _ioctl(fd: int, request: int, arg: int | bytes, what: str) -> int:
    checkpoint(Op.KVM_IOCTL)
    if isinstance(arg, bytes):
        buf = ctypes.create_string_buffer(arg, len(arg))
        ret = _libc.ioctl(fd, request, ctypes.cast(buf, ctypes.c_void_p))
    else:
        ret = _libc.ioctl(fd, request, ctypes.c_void_p(arg))
    if ret < 0:
        err = ctypes.get_errno()
        raise HostMemoryError(err, f"{what}: {os.strerror(err)}")
    return int(ret)


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> None:
    ret = _libc.fallocate(fd, mode, offset, length)
    if ret < 0:
        err = ctypes.get_errno()
        raise HostMemoryError(err, f"{what} [{offset:#x}, +{length:#x}): {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free ``[offset, offset+length)`` of a guest_memfd (the private copy of shared pages)."""
    checkpoint(Op.DISCARD)
    _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length, "guest_memfd punch hole")


def allocate(fd: int, offset: int, length: int) -> None:
    """Allocate ``[offset, offset+length)`` of a guest_memfd, as a guest touching private
    memory would (guest_memfd accepts only KEEP_SIZE allocation)."""
    checkpoint(Op.POPULATE)
    _fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length, "guest_memfd allocate")


def unevictable_bytes() -> int:
    """System-wide unevictable memory (guest_memfd folios count here), in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Unevictable:"):
                return int(line.split()[1]) * 1024
    raise HostMemoryError(0, "/proc/meminfo has no Unevictable line")


@dataclass
class GmemVm:
    """A KVM VM able to create guest_memfds. Close it when done."""

    fd: int
    vm_type: int
    supports_private_attribute: bool
    _kvm_fd: int = field(repr=False, default=-1)

    @property
    def vm_type_name(self) -> str:
        return VM_TYPE_NAMES.get(self.vm_type, str(self.vm_type))

    @classmethod
    def open(cls, path: str = "/dev/kvm") -> GmemVm:
        """Create a VM of the best type offering guest_memfd; GmemUnavailable if none."""
        try:
            kvm = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise GmemUnavailable(exc.errno or 0, f"cannot open {path}: {exc.strerror}") from None
        try:
            types = _ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_VM_TYPES, "KVM_CHECK_EXTENSION(VM_TYPES)")
            candidates = [t for t in (KVM_X86_SW_PROTECTED_VM, KVM_X86_DEFAULT_VM) if types & (1 << t)]
            if not types:
                candidates = [KVM_X86_DEFAULT_VM]
            for vm_type in candidates:
                try:
                    vm = _ioctl(kvm, KVM_CREATE_VM, vm_type, "KVM_CREATE_VM")
                except HostMemoryError:
                    continue
                if _ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_GUEST_MEMFD, "CHECK_EXTENSION") <= 0:
                    os.close(vm)
                    continue
                attrs = _ioctl(vm, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES, "CHECK_EXTENSION")
                return cls(vm, vm_type, bool(attrs & KVM_MEMORY_ATTRIBUTE_PRIVATE), kvm)
            raise GmemUnavailable(0, f"no VM type among {candidates} offers KVM_CAP_GUEST_MEMFD")
        except BaseException:
            os.close(kvm)
            raise

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """A new guest_memfd of ``size`` bytes; the caller owns (and closes) the fd."""
        return _ioctl(
            self.fd,
            KVM_CREATE_GUEST_MEMFD,
            _CREATE_GMEM.pack(size, flags, *[0] * 6),
            "KVM_CREATE_GUEST_MEMFD",
        )

    def set_user_memory_region2(
        self,
        slot: int,
        gpa: int,
        size: int,
        userspace_addr: int,
        *,
        guest_memfd: int = -1,
        guest_memfd_offset: int = 0,
        flags: int = 0,
    ) -> None:
        """Create, change or (size 0) delete a memslot; with ``guest_memfd`` it is bound to
        it (``KVM_MEM_GUEST_MEMFD``)."""
        if guest_memfd >= 0:
            flags |= KVM_MEM_GUEST_MEMFD
        arg = _REGION2.pack(
            slot, flags, gpa, size, userspace_addr, guest_memfd_offset, max(guest_memfd, 0), 0, *[0] * 14
        )
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION2, arg, f"KVM_SET_USER_MEMORY_REGION2 slot {slot}")

    def set_memory_attributes(self, gpa: int, size: int, private: bool) -> None:
        """Mark guest-physical ``[gpa, gpa+size)`` private or shared."""
        arg = _ATTRS.pack(gpa, size, KVM_MEMORY_ATTRIBUTE_PRIVATE if private else 0, 0)
        _ioctl(self.fd, KVM_SET_MEMORY_ATTRIBUTES, arg, f"KVM_SET_MEMORY_ATTRIBUTES [{gpa:#x}, +{size:#x})")

    def close(self) -> None:
        for fd in (self.fd, self._kvm_fd):
            if fd >= 0:
                os.close(fd)
        self.fd = self._kvm_fd = -1
