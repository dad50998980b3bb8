"""RealGuest: QEMU (TCG) runs a stock Linux guest whose virtio-mem device is ramdiscard's.

Rules:

* ramdiscard owns the guest RAM: one memfd :class:`~ramdiscard.hostmem.RamBlock` of
  ``low + region`` bytes, handed to QEMU as ``memory-backend-file`` on ``/dev/fd/N``
  (shared). q35 maps the first ``low`` (2 GiB) at GPA 0 and the rest at 4 GiB; the device
  region is that upper part, hidden from the guest's normal RAM by ``memmap=``. The
  device's RAM block is a :class:`MemfdWindow` over it: discard = hole punch in the memfd
  at ``low + offset``.
* The VirtioMem (block size 2 MiB), a VFIO-style container pinning with io_uring (VmPin)
  and the vhost-user server live in this process. ramdiscard listens on three UNIX sockets
  in a private temporary directory (vhost-user, serial console, QEMU's QMP); QEMU
  connects to each as a client, so nothing is lost before ramdiscard reads it.
* QEMU's QMP ``RESET`` event unplugs everything (``system_reset``) before the guest runs
  its driver again; a vanished QEMU does the same.
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
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramdiscard.consumers.dma import make_backend
from ramdiscard.consumers.vfio import VfioContainer
from ramdiscard.errors import HostError, RamDiscardError
from ramdiscard.hostmem import RamBlock
from ramdiscard.hostmem.measure import proc_status
from ramdiscard.interfaces import VirtqElement, Virtqueue
from ramdiscard.memory import AddressSpace, MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.providers.virtio_mem.wire import Request, RequestType, ResponseType
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.realguest.guestimage import guest_image
from ramdiscard.realguest.qemu import find_qemu
from ramdiscard.realguest.qmpclient import QmpClient
from ramdiscard.units import GiB, MiB, align_up
from ramdiscard.vhost_user.server import VhostUserServer

LOW_RAM = 2 * GiB
DEVICE_ADDR = 4 * GiB
BLOCK_SIZE = 2 * MiB
CONFIG_SIZE = 56
VIRTIO_ID_MEM = 24


class RealGuestError(HostError):
    """The real guest could not be started or did not answer in time."""


class MemfdWindow:
    """``size`` bytes at ``offset`` of a RAM block, as a RAM block of its own (host memory,
    discard, populate, resident bytes); ranges are checked by the underlying block."""

    def __init__(self, block: RamBlock, offset: int, size: int) -> None:
        self.block, self.offset, self._size = block, offset, size

    @property
    def size(self) -> int:
        return self._size

    @property
    def host_address(self) -> int:
        return self.block.host_address + self.offset

    @property
    def page_size(self) -> int:
        return self.block.page_size

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self._size:
            raise RealGuestError(f"range {offset:#x}+{length:#x} outside the {self._size:#x}-byte window")

    def discard_range(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self.block.discard_range(self.offset + offset, length)

    def populate(self, offset: int, length: int, *, write: bool = True) -> None:
        self._check(offset, length)
        self.block.populate(self.offset + offset, length, write=write)

    def resident_bytes(self, offset: int = 0, length: int | None = None) -> int:
        length = self._size - offset if length is None else length
        self._check(offset, length)
        return self.block.resident_bytes(self.offset + offset, length)


class TraceRecorder:
    """Device events in QEMU's trace-log format (``PID@SECONDS:event args``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def add(self, event: str, args: str = "") -> None:
        with self._lock:
            self.lines.append(f"{os.getpid()}@{time.time():.6f}:{event} {args}".rstrip())

    def text(self) -> str:
        with self._lock:
            return "".join(line + "\n" for line in self.lines)


class TracingQueue:
    """Passes a Virtqueue through, recording each request and response."""

    def __init__(self, inner: Virtqueue, trace: TraceRecorder) -> None:
        self.inner, self.trace = inner, trace

    def pop(self) -> VirtqElement | None:
        element = self.inner.pop()
        if element is not None and len(element.request) >= 24:
            with contextlib.suppress(RamDiscardError, ValueError):
                req = Request.parse(element.request)
                names = {
                    RequestType.PLUG: "virtio_mem_plug_request",
                    RequestType.UNPLUG: "virtio_mem_unplug_request",
                    RequestType.STATE: "virtio_mem_state_request",
                }
                if req.type is RequestType.UNPLUG_ALL:
                    self.trace.add("virtio_mem_unplug_all_request")
                elif req.type in names:
                    self.trace.add(names[req.type], f"addr=0x{req.addr:x} nb_blocks={req.nb_blocks}")
        return element

    def push(self, element: VirtqElement, response: bytes) -> None:
        self.inner.push(element, response)
        if len(response) >= 2:
            (rtype,) = struct.unpack_from("<H", response)
            self.trace.add("virtio_mem_send_response", f"type={rtype}")
            state_request = struct.unpack_from("<H", element.request)[0] == RequestType.STATE
            if rtype == ResponseType.ACK and state_request and len(response) >= 10:
                state = struct.unpack_from("<H", response, 8)[0]
                self.trace.add("virtio_mem_state_response", f"state={state}")

    def detach(self, element: VirtqElement) -> None:
        self.inner.detach(element)

    def notify(self) -> None:
        self.inner.notify()


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
    ) -> None:
        self.qemu = qemu if qemu is not None else find_qemu()
        self.kernel, self.initramfs = guest_image()
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
        self.ram = RamBlock(LOW_RAM + self.region_size, "memfd", name="guest-ram")
        self._closers.append(self.ram.close)
        self.window = MemfdWindow(self.ram, LOW_RAM, self.region_size)
        self.policy = DiscardPolicy()
        self.region = MemoryRegion.new_ram("vmem0-mem", self.window)
        self.trace.add("memory_device_pre_plug", f"id=vmem0 addr=0x{DEVICE_ADDR:x}")
        self.device = VirtioMem(
            self.region,
            addr=DEVICE_ADDR,
            block_size=BLOCK_SIZE,
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
        )
        self._closers.append(self.server.close)
        orig_process = self.device.process_queue
        self.device.process_queue = lambda vq: orig_process(TracingQueue(vq, self.trace))  # type: ignore[method-assign]
        self.server.start()
        self._launch()

    def _listen(self, name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.dir / name))
        sock.listen(1)
        sock.settimeout(self.boot_timeout)
        self._closers.append(sock.close)
        return sock

    def qemu_args(self) -> list[str]:
        total = LOW_RAM + self.region_size
        gib = self.region_size
        append = (
            f"console=ttyS0 memmap={gib // MiB}M${DEVICE_ADDR:#x} memhp_default_state=online_movable "
            "panic=-1 loglevel=7"
        )
        return [
            str(self.qemu),
            "-nodefaults", "-display", "none", "-vga", "none", "-no-user-config",
            "-machine", "q35,memory-backend=mem", "-accel", "tcg", "-smp", "1", "-m", f"{total // MiB}M",
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
        serial_listener = self._listen("serial.sock")
        qmp_listener = self._listen("qmp.sock")
        assert self.ram.fd is not None
        log = open(self.dir / "qemu.log", "wb")  # noqa: SIM115 (closed with the guest)
        self._closers.append(log.close)
        self._proc = subprocess.Popen(
            self.qemu_args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(self.ram.fd,),
        )  # fmt: skip
        try:
            self._serial, _ = serial_listener.accept()
            qmp_conn, _ = qmp_listener.accept()
        except OSError as exc:
            raise RealGuestError(f"QEMU did not connect: {exc}; {self._qemu_output()}") from None
        self.qmp = QmpClient(qmp_conn, self._qemu_event)
        self.qmp.start(timeout=self.boot_timeout)
        threading.Thread(target=self._read_console, name="guest-console", daemon=True).start()
        self.wait_console("RAMDISCARD-READY", self.boot_timeout)

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
        if self.device.realized and self.device.plugged_size:
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

    def _read_console(self) -> None:
        assert self._serial is not None
        buf = b""
        while True:
            try:
                data = self._serial.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            with self._console_cv:
                for raw in lines:
                    line = raw.decode(errors="replace").rstrip("\r")
                    self.console.append(line)
                    if self.on_console is not None:
                        self.on_console(line)
                self._console_cv.notify_all()
        with self._console_cv:
            self.console.append("<console closed>")
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
            grown = align_up(size + dev.usable_extent, dev.block_size)
            wanted = 0 if size == 0 else min(dev.region_size, grown)
            if wanted >= old:
                self.trace.add(
                    "virtio_mem_resized_usable_region",
                    f"old_size=0x{old:x} new_size=0x{dev.usable_region_size:x}",
                )

    def sizes(self) -> Sizes:
        with self.lock:
            return Sizes(
                guest_memtotal=self.guest_memtotal(),
                plugged=self.device.plugged_size,
                pinned=self.dma.pinned_bytes,
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
