"""Typed wrappers over the raw KVM ioctls that memory management needs.

Rules:

* One method per ioctl; arguments are checked (InvalidArgument, nothing done) before the
  call, and every ioctl passes ``faults.checkpoint(Op.KVM_IOCTL)`` first.
* A refused ioctl raises :class:`HostMemoryError` carrying the kernel's errno and a message
  naming the ioctl and its arguments (e.g. EEXIST for overlapping memslots, EINVAL for a
  slot id beyond ``KVM_CAP_NR_MEMSLOTS``, ENOTTY for an ioctl this kernel lacks).
* Objects own their fds: :class:`Kvm` the ``/dev/kvm`` fd, :class:`KvmVm` the VM fd.
  A guest_memfd returned by :meth:`KvmVm.create_guest_memfd` belongs to the caller.

Theory: ioctl request numbers are computed with the ``_IO/_IOR/_IOW/_IOWR`` encoding from
``ctypes`` structure sizes that mirror ``<linux/kvm.h>``; the installed uapi header may be
older than the running kernel (guest_memfd arrived in 6.8), so the layouts live here.
Memory slots are the KVM view of guest RAM: ``KVM_SET_USER_MEMORY_REGION`` maps
``[guest_phys_addr, +memory_size)`` onto host virtual memory (size 0 deletes the slot);
``KVM_SET_USER_MEMORY_REGION2`` can also back a slot with a *guest_memfd*, a file of guest
memory the host cannot normally map, which is discarded with ``fallocate(PUNCH_HOLE)``.

What this machine (Linux 6.18, ``kvm_pvm``) supports, probed with
:meth:`Kvm.probe_guest_memfd`: only VM type 0 (``KVM_X86_DEFAULT_VM``; KVM_CAP_VM_TYPES =
0x1, so ``KVM_X86_SW_PROTECTED_VM`` = 1 is refused with EINVAL); guest_memfd works on that
default VM (KVM_CAP_GUEST_MEMFD = 1, flags MMAP | INIT_SHARED), memslots bind to it, and
``fallocate`` allocates (with KEEP_SIZE) and punches holes; KVM_CAP_MEMORY_ATTRIBUTES is
0, so ``KVM_SET_MEMORY_ATTRIBUTES`` fails with ENOTTY.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
from dataclasses import dataclass
from types import TracebackType

from ramdiscard import faults
from ramdiscard.errors import HostMemoryError, InvalidArgument
from ramdiscard.hostmem import syscalls

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


def _IO(type_: int, nr: int) -> int:
    return _ioc(_IOC_NONE, type_, nr, 0)


def _IOW(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, type_, nr, ctypes.sizeof(struct))


def _IOWR(type_: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, type_, nr, ctypes.sizeof(struct))


class KvmUserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    ]


class KvmUserspaceMemoryRegion2(ctypes.Structure):
    """struct kvm_userspace_memory_region2 (160 bytes)."""

    _fields_ = [
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
        ("guest_memfd_offset", ctypes.c_uint64),
        ("guest_memfd", ctypes.c_uint32),
        ("pad1", ctypes.c_uint32),
        ("pad2", ctypes.c_uint64 * 14),
    ]


class KvmCreateGuestMemfd(ctypes.Structure):
    """struct kvm_create_guest_memfd."""

    _fields_ = [
        ("size", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64 * 6),
    ]


class KvmMemoryAttributes(ctypes.Structure):
    """struct kvm_memory_attributes."""

    _fields_ = [
        ("address", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("attributes", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


KVMIO = 0xAE
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, KvmUserspaceMemoryRegion)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, KvmUserspaceMemoryRegion2)
KVM_SET_MEMORY_ATTRIBUTES = _IOW(KVMIO, 0xD2, KvmMemoryAttributes)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, KvmCreateGuestMemfd)

KVM_API_VERSION = 12

KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_GUEST_MEMFD_FLAGS = 244

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1

KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1

_PAGE = 4096
_U64_MAX = (1 << 64) - 1
_U32_MAX = (1 << 32) - 1

_FALLOC_FL_KEEP_SIZE = syscalls.FALLOC_FL_KEEP_SIZE
_FALLOC_FL_PUNCH_HOLE = syscalls.FALLOC_FL_PUNCH_HOLE
_EINTR_RETRIES = 100


def _ioctl(fd: int, request: int, arg: int | ctypes.Structure, what: str) -> int:
    faults.checkpoint(faults.Op.KVM_IOCTL)
    # EINTR means the kernel undid the call, so it is repeated. KVM_CREATE_VM was seen to
    # fail so here, with no signal delivered, in a process that had just closed io_uring
    # rings (probably task_work notification making signal_pending() true).
    for _ in range(_EINTR_RETRIES):
        try:
            return fcntl.ioctl(fd, request, arg)
        except InterruptedError:
            continue
        except OSError as e:
            code = e.errno if e.errno is not None else errno.EIO
            raise HostMemoryError(code, f"{what} failed: {os.strerror(code)}") from e
    raise HostMemoryError(errno.EINTR, f"{what} failed: interrupted {_EINTR_RETRIES} times")


def _check_u64(name: str, value: int, align: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise InvalidArgument(f"{name}={value:#x} is outside [0, 2^64)")
    if value % align:
        raise InvalidArgument(f"{name}={value:#x} is not a multiple of {align:#x}")


def _check_u32(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U32_MAX:
        raise InvalidArgument(f"{name}={value!r} is not a 32-bit unsigned int")


def _fallocate(fd: int, mode: int, offset: int, length: int, what: str) -> None:
    _check_u64("offset", offset, _PAGE)
    _check_u64("length", length, _PAGE)
    if length == 0:
        raise InvalidArgument(f"{what}: length must be positive")
    # guest_memfd allocation stops with EINTR whenever signal_pending() (seen here after
    # io_uring use, see _ioctl); allocate and punch are idempotent, so retry.
    for attempt in range(_EINTR_RETRIES):
        try:
            syscalls.fallocate(fd, mode, offset, length)
            return
        except HostMemoryError as exc:
            if exc.errno != errno.EINTR or attempt == _EINTR_RETRIES - 1:
                raise HostMemoryError(
                    exc.errno or errno.EIO, f"{what} of guest_memfd: {exc.strerror}"
                ) from None


def guest_memfd_allocate(fd: int, offset: int, length: int) -> None:
    """Allocate (populate) ``[offset, +length)`` of a guest_memfd.

    guest_memfd accepts only ``fallocate(KEEP_SIZE)`` (plain mode 0 is EOPNOTSUPP).
    Passes ``faults.checkpoint(Op.POPULATE)``.
    """
    faults.checkpoint(faults.Op.POPULATE)
    _fallocate(fd, _FALLOC_FL_KEEP_SIZE, offset, length, "fallocate(KEEP_SIZE)")


def guest_memfd_punch_hole(fd: int, offset: int, length: int) -> None:
    """Discard ``[offset, +length)`` of a guest_memfd: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``
    frees the pages; later use allocates zeroed ones. Passes ``faults.checkpoint(Op.DISCARD)``.
    """
    faults.checkpoint(faults.Op.DISCARD)
    _fallocate(
        fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length,
        "fallocate(PUNCH_HOLE|KEEP_SIZE)",
    )  # fmt: skip


@dataclass(frozen=True)
class GuestMemfdProbe:
    """What guest_memfd support this host has, found by trying it."""

    supported: bool
    vm_types: tuple[int, ...]
    """VM types on which KVM_CREATE_GUEST_MEMFD succeeded."""
    flags: int
    """KVM_CAP_GUEST_MEMFD_FLAGS (0 if the kernel predates it)."""
    memory_attributes: int
    """KVM_CAP_MEMORY_ATTRIBUTES of the first working VM type (0: not supported)."""
    reason: str


class Kvm:
    """An open ``/dev/kvm``. Raises HostMemoryError if it cannot be opened."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            code = e.errno if e.errno is not None else errno.EIO
            raise HostMemoryError(code, f"open({path}) failed: {os.strerror(code)}") from e
        self.path = path

    @staticmethod
    def available(path: str = "/dev/kvm") -> tuple[bool, str]:
        """Whether ``path`` opens and speaks KVM API version 12; the reason if not."""
        if not os.path.exists(path):
            return False, f"{path} does not exist (no KVM module loaded or no device)"
        try:
            with Kvm(path) as kvm:
                version = kvm.api_version()
        except HostMemoryError as e:
            return False, str(e)
        if version != KVM_API_VERSION:
            return False, f"KVM API version {version}, expected {KVM_API_VERSION}"
        return True, f"{path}: KVM API {version}"

    def api_version(self) -> int:
        return _ioctl(self._fd(), KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on /dev/kvm: 0 if absent, else a cap-specific value."""
        return _ioctl(self._fd(), KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def nr_memslots(self) -> int:
        """Memory slots a VM may have (KVM_CAP_NR_MEMSLOTS)."""
        return self.check_extension(KVM_CAP_NR_MEMSLOTS)

    def vm_types(self) -> int:
        """Bitmask of VM types KVM_CREATE_VM accepts (bit 0 only if the cap is absent)."""
        return self.check_extension(KVM_CAP_VM_TYPES) or 1 << KVM_X86_DEFAULT_VM

    def create_vm(self, machine_type: int = KVM_X86_DEFAULT_VM) -> KvmVm:
        return KvmVm(self, machine_type)

    def probe_guest_memfd(self) -> GuestMemfdProbe:
        """Try KVM_CREATE_GUEST_MEMFD on every VM type this KVM accepts."""
        types = self.vm_types()
        flags = self.check_extension(KVM_CAP_GUEST_MEMFD_FLAGS)
        working: list[int] = []
        attributes = 0
        failures: list[str] = []
        for vm_type in range(types.bit_length()):
            if not types >> vm_type & 1:
                continue
            try:
                with self.create_vm(vm_type) as vm:
                    if not vm.check_extension(KVM_CAP_GUEST_MEMFD):
                        failures.append(f"type {vm_type}: KVM_CAP_GUEST_MEMFD=0")
                        continue
                    os.close(vm.create_guest_memfd(2 << 20))
                    if not working:
                        attributes = vm.check_extension(KVM_CAP_MEMORY_ATTRIBUTES)
                    working.append(vm_type)
            except HostMemoryError as e:
                failures.append(f"type {vm_type}: {e}")
        if working:
            reason = f"guest_memfd works on VM types {working} (KVM_CAP_VM_TYPES={types:#x})"
        else:
            reason = f"no VM type supports guest_memfd (KVM_CAP_VM_TYPES={types:#x}): " + (
                "; ".join(failures) or "none tried"
            )
        return GuestMemfdProbe(bool(working), tuple(working), flags, attributes, reason)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _fd(self) -> int:
        if self.fd < 0:
            raise InvalidArgument("Kvm is closed")
        return self.fd

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class KvmVm:
    """A VM fd from KVM_CREATE_VM. With ``kvm=None`` it opens (and later closes) its own
    ``/dev/kvm``."""

    def __init__(self, kvm: Kvm | None = None, machine_type: int = KVM_X86_DEFAULT_VM) -> None:
        _check_u32("machine_type", machine_type)
        self._own_kvm = kvm is None
        self.kvm = Kvm() if kvm is None else kvm
        try:
            self.fd = _ioctl(
                self.kvm._fd(), KVM_CREATE_VM, machine_type, f"KVM_CREATE_VM(type={machine_type})"
            )
        except BaseException:
            if self._own_kvm:
                self.kvm.close()
            raise
        self.machine_type = machine_type

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers can depend on the VM type)."""
        return _ioctl(self._fd(), KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap}) on VM")

    def nr_memslots(self) -> int:
        return self.check_extension(KVM_CAP_NR_MEMSLOTS)

    def supports_guest_memfd(self) -> bool:
        """KVM_CAP_GUEST_MEMFD on this VM (on x86 the answer depends on the VM type)."""
        return self.check_extension(KVM_CAP_GUEST_MEMFD) != 0

    def set_user_memory_region(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        flags: int = 0,
    ) -> None:
        """Create, move or (``memory_size == 0``) delete memory slot ``slot``.

        Addresses and size must be 4 KiB multiples. Overlapping another slot: EEXIST.
        """
        _check_u32("slot", slot)
        _check_u32("flags", flags)
        _check_u64("guest_phys_addr", guest_phys_addr, _PAGE)
        _check_u64("memory_size", memory_size, _PAGE)
        _check_u64("userspace_addr", userspace_addr, _PAGE)
        region = KvmUserspaceMemoryRegion(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
        )
        _ioctl(
            self._fd(), KVM_SET_USER_MEMORY_REGION, region,
            f"KVM_SET_USER_MEMORY_REGION(slot={slot}, gpa={guest_phys_addr:#x}, "
            f"size={memory_size:#x}, uaddr={userspace_addr:#x}, flags={flags:#x})",
        )  # fmt: skip

    def delete_memory_region(self, slot: int) -> None:
        """Delete slot ``slot`` (KVM_SET_USER_MEMORY_REGION with size 0)."""
        self.set_user_memory_region(slot, 0, 0, 0)

    def set_user_memory_region2(
        self,
        slot: int,
        guest_phys_addr: int,
        memory_size: int,
        userspace_addr: int,
        guest_memfd: int,
        guest_memfd_offset: int = 0,
        flags: int = KVM_MEM_GUEST_MEMFD,
    ) -> None:
        """KVM_SET_USER_MEMORY_REGION2: like :meth:`set_user_memory_region`, with the slot
        backed by ``[guest_memfd_offset, +memory_size)`` of ``guest_memfd`` when ``flags``
        has KVM_MEM_GUEST_MEMFD (the default). Deleting passes ``memory_size=0``."""
        _check_u32("slot", slot)
        _check_u32("flags", flags)
        _check_u32("guest_memfd", guest_memfd)
        _check_u64("guest_phys_addr", guest_phys_addr, _PAGE)
        _check_u64("memory_size", memory_size, _PAGE)
        _check_u64("userspace_addr", userspace_addr, _PAGE)
        _check_u64("guest_memfd_offset", guest_memfd_offset, _PAGE)
        region = KvmUserspaceMemoryRegion2(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=memory_size,
            userspace_addr=userspace_addr,
            guest_memfd_offset=guest_memfd_offset,
            guest_memfd=guest_memfd,
        )
        _ioctl(
            self._fd(), KVM_SET_USER_MEMORY_REGION2, region,
            f"KVM_SET_USER_MEMORY_REGION2(slot={slot}, gpa={guest_phys_addr:#x}, "
            f"size={memory_size:#x}, uaddr={userspace_addr:#x}, gmem_fd={guest_memfd}, "
            f"gmem_off={guest_memfd_offset:#x}, flags={flags:#x})",
        )  # fmt: skip

    def create_guest_memfd(self, size: int, flags: int = 0) -> int:
        """KVM_CREATE_GUEST_MEMFD: a new guest_memfd of ``size`` bytes (4 KiB multiple,
        positive); returns its fd, which the caller must close."""
        _check_u64("size", size, _PAGE)
        _check_u64("flags", flags)
        if size == 0:
            raise InvalidArgument("guest_memfd size must be positive")
        arg = KvmCreateGuestMemfd(size=size, flags=flags)
        return _ioctl(
            self._fd(), KVM_CREATE_GUEST_MEMFD, arg,
            f"KVM_CREATE_GUEST_MEMFD(size={size:#x}, flags={flags:#x})",
        )  # fmt: skip

    def set_memory_attributes(self, address: int, size: int, attributes: int) -> None:
        """KVM_SET_MEMORY_ATTRIBUTES on guest-physical ``[address, +size)``, e.g.
        ``KVM_MEMORY_ATTRIBUTE_PRIVATE`` or 0 for shared. ENOTTY when the kernel or VM
        type has no memory attributes (KVM_CAP_MEMORY_ATTRIBUTES = 0)."""
        _check_u64("address", address, _PAGE)
        _check_u64("size", size, _PAGE)
        _check_u64("attributes", attributes)
        arg = KvmMemoryAttributes(address=address, size=size, attributes=attributes, flags=0)
        _ioctl(
            self._fd(), KVM_SET_MEMORY_ATTRIBUTES, arg,
            f"KVM_SET_MEMORY_ATTRIBUTES([{address:#x}, +{size:#x}), attributes={attributes:#x})",
        )  # fmt: skip

    def close(self) -> None:
        """Close the VM fd (KVM drops all its memslots) and an owned /dev/kvm fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._own_kvm:
            self.kvm.close()

    def _fd(self) -> int:
        if self.fd < 0:
            raise InvalidArgument("KvmVm is closed")
        return self.fd

    def __enter__(self) -> KvmVm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
