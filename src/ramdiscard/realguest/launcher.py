"""RealGuest: QEMU (TCG) runs a stock Linux guest whose virtio-mem device is ramdiscard's.

Rules:

* ramdiscard owns the guest RAM: one memfd :class:`~ramdiscard.hostmem.RamBlock` of
  ``ram + region`` bytes, handed to QEMU as ``memory-backend-file`` on ``/dev/fd/N``
  (shared). q35 (``max-ram-below-4g`` = ``ram``) maps the first ``ram`` bytes (256 MiB to
  2 GiB) at GPA 0 and the rest at 4 GiB; the device region is that upper part, hidden
  from the guest's normal RAM by ``memmap=``. The device's RAM block is a
  :class:`MemfdWindow` over it: discard = hole punch in the memfd at ``ram + offset``.
* The VirtioMem (block size 2 MiB by default), the consumers (``"vfio"``: a VFIO-style
  container pinning with io_uring, VmPin) and the vhost-user server live in this
  process. ramdiscard listens on three UNIX sockets in a private temporary directory
  (vhost-user, serial console, QEMU's QMP); QEMU connects to each as a client, so nothing
  is lost before ramdiscard reads it.
* QEMU's QMP ``RESET`` event unplugs everything (``system_reset``) before the guest runs
  its driver again; a vanished QEMU (or vhost-user connection) does the same: every
  block unplugged and discarded, every pin released, the broken flag cleared.
* :meth:`RealGuest.kill_qemu` (SIGKILL) and :meth:`RealGuest.restart_qemu` replace QEMU
  while the backend runs: the new QEMU connects to the same sockets and maps the same
  memfd; the guest's normal RAM is discarded first (the old machine is gone).
* ``set_requested_size`` changes the device and sends the config-change message.
* :meth:`RealGuest.close` stops QEMU (quit, then kill after a bound) and releases the
  device, pins, sockets and memory; it is idempotent.
* Every device event is recorded (:attr:`RealGuest.trace`) in QEMU's trace-log format,
  which ``ramdiscard replay`` reads, with what QEMU itself logs around it: the
  ``memory_device_(pre_)plug`` and realize-time discard and usable-region size,
  ``unplugged_all`` plus the usable region after a system reset, and a usable-region
  line for every requested-size write that does not shrink it, so the log alone gives
  replay the geometry and the requested sizes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramdiscard.consumers.dma import DmaBackend, make_backend
from ramdiscard.consumers.vfio import VfioContainer
from ramdiscard.errors import HostError, RamDiscardError
from ramdiscard.hostmem import RamBlock
from ramdiscard.hostmem.measure import proc_status
from ramdiscard.machine.scenario.realguest import (
    DEVICE_ADDR,
    GUEST_CONSUMERS,
    MAX_GUEST_RAM,
    guest_ram_problem,
)
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.providers.virtio_mem.wire import CONFIG_SIZE, VIRTIO_ID_MEM
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.realguest.guestimage import guest_image
from ramdiscard.realguest.memfd import MemfdWindow, WindowError, file_identity, mapped_identities
from ramdiscard.realguest.qemu import find_qemu
from ramdiscard.realguest.qmpclient import QmpClient
from ramdiscard.realguest.tracing import TraceRecorder, TracingQueue
from ramdiscard.units import GiB, MiB
from ramdiscard.vhost_user.server import VhostUserServer

LOW_RAM = MAX_GUEST_RAM
BLOCK_SIZE = 2 * MiB
CONSUMERS = GUEST_CONSUMERS

__all__ = [
    "BLOCK_SIZE", "CONSUMERS", "DEVICE_ADDR", "LOW_RAM", "MemfdWindow", "RealGuest", "RealGuestError",
    "Sizes", "TraceRecorder", "TracingQueue",
]  # fmt: skip


class RealGuestError(HostError):
    """The real guest could not be started or did not answer in time."""


@dataclass(frozen=True)
class Sizes:
    """One measurement: guest MemTotal (bytes), device plugged size, the consumer's
    pinned bytes, this process's VmPin and the device region's resident bytes."""

    guest_memtotal: int
    plugged: int
    pinned: int
    vm_pin: int
    resident: int


class RealGuest:
    """A running real guest; see the module rules. Use as a context manager."""

    def __init__(
        self,
        *,
        region_size: int = 2 * GiB,
        requested_size: int = 512 * MiB,
        workdir: str | os.PathLike[str] | None = None,
        qemu: Path | None = None,
        boot_timeout: float = 240.0,
        on_console: Callable[[str], None] | None = None,
        ram_size: int = LOW_RAM,
        block_size: int = BLOCK_SIZE,
        kernel: Path | None = None,
        initramfs: Path | None = None,
        consumers: Sequence[str] = CONSUMERS,
    ) -> None:
        """Boot the guest (bounded by ``boot_timeout`` s). Raises RealGuestError for a
        ``ram_size`` that is not a multiple of 128 MiB in [256 MiB, 2 GiB] or an unknown
        consumer, QemuNotFound / GuestImageError without QEMU or image, and the device's
        own errors for a bad geometry; nothing stays running or held when it raises."""
        problem = guest_ram_problem(ram_size)
        if problem is not None:
            raise RealGuestError(f"guest RAM {problem}, got {ram_size:#x}")
        unknown = sorted(set(consumers) - set(CONSUMERS))
        if unknown:
            known = ", ".join(CONSUMERS)
            raise RealGuestError(f"unknown real-guest consumer {unknown[0]!r} (known: {known})")
        self.qemu = qemu if qemu is not None else find_qemu()
        if kernel is None or initramfs is None:
            cached_kernel, cached_initramfs = guest_image()
            kernel = kernel or cached_kernel
            initramfs = initramfs or cached_initramfs
        self.kernel, self.initramfs = kernel, initramfs
        self.ram_size = ram_size
        self.block_size = block_size
        self.consumers = tuple(consumers)
        self.region_size = region_size
        self.boot_timeout = boot_timeout
        self.on_console = on_console
        self.lock = threading.RLock()
        self.trace = TraceRecorder()
        self.console: list[str] = []
        self.events: list[str] = []
        self.vhost_messages: list[str] = []
        self._console_cv = threading.Condition()
        self._closers: list[Callable[[], None]] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self.qmp: QmpClient | None = None
        self._serial: socket.socket | None = None
        self._listeners: dict[str, socket.socket] = {}
        self.dma: DmaBackend | None = None
        self.boots = 0
        self._vm_pin_base = proc_status().vm_pin
        try:
            self._build(requested_size, workdir)
        except BaseException:
            self.close()
            raise

    # -- setup ---------------------------------------------------------------------------

    def _build(self, requested_size: int, workdir: str | os.PathLike[str] | None) -> None:
        tmp = tempfile.TemporaryDirectory(prefix="ramdiscard-guest-", dir=workdir)
        self._closers.append(tmp.cleanup)
        self.dir = Path(tmp.name)
        self.ram = RamBlock(self.ram_size + self.region_size, "memfd", name="guest-ram")
        self._closers.append(self.ram.close)
        self.window = MemfdWindow(self.ram, self.ram_size, self.region_size)
        self.policy = DiscardPolicy()
        self.region = MemoryRegion.new_ram("vmem0-mem", self.window)
        self.trace.add("memory_device_pre_plug", f"id=vmem0 addr=0x{DEVICE_ADDR:x}")
        self.device = VirtioMem(
            self.region,
            addr=DEVICE_ADDR,
            block_size=self.block_size,
            requested_size=requested_size,
            policy=self.policy,
            on_host_discard=self._traced_discard,
        )
        self._closers.append(self.device.unrealize)
        self.trace.add(
            "virtio_mem_resized_usable_region", f"old_size=0x0 new_size=0x{self.device.usable_region_size:x}"
        )
        self.trace.add("memory_device_plug", f"id=vmem0 addr=0x{DEVICE_ADDR:x}")
        self.device.add_config_change_notifier(lambda _dev: self._config_changed())
        root = MemoryRegion.new_container("system", 1 << 40)
        root.add_subregion(DEVICE_ADDR, self.device.device_region)
        self.space = AddressSpace("system memory", root)
        if "vfio" in self.consumers:
            self.dma = make_backend("io_uring")
            self._closers.append(self.dma.close)
            self.container = VfioContainer(self.dma, policy=self.policy)
            self._closers.append(self.container.close)
            self.container.attach(self.space)

        self.server = VhostUserServer(
            str(self.dir / "vhost.sock"),
            self.device,
            lock=self.lock,
            on_disconnect=self._frontend_gone,
            on_message=self.vhost_messages.append,
            wrap_queue=lambda vq: TracingQueue(vq, self.trace),
        )
        self._closers.append(self.server.close)
        self.server.start()
        self._listeners = {name: self._listen(name) for name in ("serial.sock", "qmp.sock")}
        self._launch()

    def _listen(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.dir / name))
        sock.listen(1)
        sock.settimeout(self.boot_timeout)
        self._closers.append(sock.close)
        return sock

    def qemu_args(self) -> list[str]:
        total = self.ram_size + self.region_size
        append = (
            f"console=ttyS0 memmap={self.region_size // MiB}M${DEVICE_ADDR:#x} "
            "memhp_default_state=online_movable panic=-1 loglevel=7"
        )
        return [
            str(self.qemu),
            "-nodefaults", "-display", "none", "-vga", "none", "-no-user-config",
            "-machine", f"q35,memory-backend=mem,max-ram-below-4g={self.ram_size // MiB}M",
            "-accel", "tcg", "-smp", "1", "-m", f"{total // MiB}M",
            "-object",
            f"memory-backend-file,id=mem,size={total // MiB}M,mem-path=/dev/fd/{self.ram.fd},share=on",
            "-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", append,
            "-chardev", f"socket,id=vhost,path={self.dir / 'vhost.sock'}",
            "-device", f"vhost-user-device-pci,chardev=vhost,virtio-id={VIRTIO_ID_MEM},num_vqs=1,"
            f"config_size={CONFIG_SIZE}",
            "-chardev", f"socket,id=ser,path={self.dir / 'serial.sock'}", "-serial", "chardev:ser",
            "-chardev", f"socket,id=qmp,path={self.dir / 'qmp.sock'}", "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip

    def _launch(self) -> None:
        assert self.ram.fd is not None
        with self._console_cv:
            self.console = []
        log = open(self.dir / "qemu.log", "wb")  # noqa: SIM115 (closed with the guest)
        self._closers.append(log.close)
        self._proc = subprocess.Popen(
            self.qemu_args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(self.ram.fd,),
        )  # fmt: skip
        self.boots += 1
        try:
            self._serial, _ = self._listeners["serial.sock"].accept()
            qmp_conn, _ = self._listeners["qmp.sock"].accept()
        except OSError as exc:
            raise RealGuestError(f"QEMU did not connect: {exc}; {self._qemu_output()}") from None
        self.qmp = QmpClient(qmp_conn, self._qemu_event)
        self.qmp.start(timeout=self.boot_timeout)
        reader = threading.Thread(
            target=self._read_console, args=(self._serial, self.console), name="guest-console", daemon=True
        )
        reader.start()
        self.wait_console("RAMDISCARD-READY", self.boot_timeout)

    def kill_qemu(self, timeout: float = 30.0) -> None:
        """SIGKILL QEMU and reap it (bounded). The backend learns of it as of any vanished
        frontend (module rules); this returns before that cleanup has necessarily run."""
        if self._proc is None:
            raise RealGuestError("QEMU was never started")
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RealGuestError(f"QEMU did not die within {timeout} s of SIGKILL") from None

    def restart_qemu(self) -> None:
        """Start a new QEMU on the same sockets and memfd and wait for its guest (bounded
        by ``boot_timeout``). Precondition: the previous QEMU has exited; raises
        RealGuestError otherwise or when the backend has not released the old connection
        within ``boot_timeout``. The guest's normal RAM is discarded before the boot."""
        if self.qemu_running:
            raise RealGuestError("QEMU is still running; stop or kill it before restarting")
        gone = "the backend to drop the old QEMU"
        self.wait_for(lambda: not self.server.connected, self.boot_timeout, gone)
        for old in (self.qmp, self._serial):
            if old is not None:
                old.close()
        self.qmp, self._serial = None, None
        self.ram.discard_range(0, self.ram_size)
        self._launch()

    def memfd_identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of ramdiscard's guest-RAM memfd."""
        assert self.ram.fd is not None
        return file_identity(self.ram.fd)

    def qemu_maps_memfd(self) -> bool:
        """Whether the running QEMU maps ramdiscard's memfd over the whole device region
        (``/proc/<pid>/maps``: same st_dev and st_ino, covering its file range)."""
        if self._proc is None or not self.qemu_running:
            return False
        try:
            maps = mapped_identities(self._proc.pid, self.ram_size, self.region_size)
        except WindowError:
            return False
        return any((dev, ino) == self.memfd_identity() for dev, ino, _off, _len in maps)

    @property
    def qemu_pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def pinned_bytes(self) -> int:
        """Bytes the consumers pin (0 without a vfio consumer)."""
        return self.dma.pinned_bytes if self.dma is not None else 0

    def _qemu_output(self) -> str:
        with contextlib.suppress(OSError):
            text = (self.dir / "qemu.log").read_text(errors="replace").strip()
            if text:
                return "QEMU said: " + text.splitlines()[-1]
        return "QEMU said nothing"

    # -- events ----------------------------------------------------------------------------

    def _traced_discard(self, offset: int, length: int) -> None:
        self.trace.add(
            "ram_block_discard_range",
            f"vmem0-mem@0x{self.window.host_address + offset:x} + 0x{length:x}: "
            "madvise: 0 fallocate: 1 ret: 0",
        )

    def _config_changed(self) -> None:
        self.server.config_changed()

    def _qemu_event(self, name: str, data: dict[str, Any]) -> None:
        self.events.append(name)
        if name == "RESET":
            with self.lock:
                self._system_reset()

    def _frontend_gone(self) -> None:
        if self.device.realized:
            self._system_reset()

    def _system_reset(self) -> None:
        """Unplug everything, logged as QEMU logs its reset: the discard (if anything was
        plugged), ``unplugged_all``, then the usable region sized from requested-size."""
        old = self.device.usable_region_size
        self.device.system_reset()
        self.trace.add("virtio_mem_unplugged_all")
        self.trace.add(
            "virtio_mem_resized_usable_region",
            f"old_size=0x{old:x} new_size=0x{self.device.usable_region_size:x}",
        )

    def _read_console(self, serial: socket.socket, console: list[str]) -> None:
        """Append ``serial``'s lines to ``console`` (this boot's list, so a previous
        QEMU's reader never writes into the next boot's console)."""
        buf = b""
        while True:
            try:
                data = serial.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._console_cv:
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    console.append(line)
                    if self.on_console is not None:
                        self.on_console(line)
                self._console_cv.notify_all()
        with self._console_cv:
            console.append("<console closed>")
            self._console_cv.notify_all()

    # -- control -----------------------------------------------------------------------------

    def wait_console(self, prefix: str, timeout: float, *, after: int = 0) -> tuple[int, str]:
        """Wait (bounded) for a console line starting with ``prefix`` at index >= after."""
        deadline = time.monotonic() + timeout
        with self._console_cv:
            while True:
                for i in range(after, len(self.console)):
                    if self.console[i].startswith(prefix):
                        return i, self.console[i]
                left = deadline - time.monotonic()
                if left <= 0 or (self.console and self.console[-1] == "<console closed>"):
                    tail = " | ".join(self.console[-5:])
                    raise RealGuestError(f"no {prefix!r} from the guest within {timeout} s (console: {tail})")
                self._console_cv.wait(left)

    def send(self, command: str) -> None:
        assert self._serial is not None
        self._serial.sendall(command.encode() + b"\n")

    def guest_memtotal(self) -> int:
        """The guest's latest reported MemTotal, in bytes."""
        with self._console_cv:
            for line in reversed(self.console):
                if line.startswith("RAMDISCARD-MEMTOTAL "):
                    return int(line.split()[1]) * 1024
        raise RealGuestError("the guest has not reported MemTotal yet")

    def set_requested_size(self, size: int) -> None:
        """Set the device's requested size; logged as QEMU logs a ``requested-size``
        write: a usable-region resize unless the sizing rule would shrink the region
        (which a write never does), equal sizes included."""
        with self.lock:
            dev = self.device
            old = dev.usable_region_size
            dev.requested_size = size
            if dev.usable_region_for(size) >= old:
                self.trace.add(
                    "virtio_mem_resized_usable_region",
                    f"old_size=0x{old:x} new_size=0x{dev.usable_region_size:x}",
                )

    def sizes(self, *, memtotal: int | None = None) -> Sizes:
        """Measure now; ``memtotal`` (bytes) replaces the guest's report when given.
        Raises RealGuestError when it is not given and the guest has not reported one."""
        with self.lock:
            return Sizes(
                guest_memtotal=self.guest_memtotal() if memtotal is None else memtotal,
                plugged=self.device.plugged_size,
                pinned=self.pinned_bytes,
                vm_pin=proc_status().vm_pin - self._vm_pin_base,
                resident=self.window.resident_bytes(),
            )

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise RealGuestError(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    @property
    def qemu_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        if self.qmp is not None and self.qemu_running:
            with contextlib.suppress(RamDiscardError):
                self.qmp.execute("quit", timeout=10)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=15)
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self._serial is not None:
            self._serial.close()
            self._serial = None
        while self._closers:
            closer = self._closers.pop()
            with contextlib.suppress(Exception):
                closer()

    def __enter__(self) -> RealGuest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
