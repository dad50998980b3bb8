"""A QmpBackend over real VirtioMem devices (on real host memory) with a fake guest
thread that plugs and unplugs, block by block, until each device's plugged size equals
its requested size; and helpers to run a server in a background event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.qmp import MemoryDeviceInfo, QmpError, QmpServer
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

BS = 2 * MiB


@dataclass
class Dev:
    vmem: VirtioMem
    ram: RamBlock
    memdev: str
    plugged: list[int] = field(default_factory=list)


class DeviceSetBackend:
    """VirtioMem devices and a guest thread; implements ``QmpBackend``."""

    def __init__(self, specs: list[tuple[str, int]], *, guest: bool = True) -> None:
        self.lock = threading.RLock()
        self.policy = DiscardPolicy()
        self.devs: dict[str, Dev] = {}
        self.closed = 0
        self.calls: list[str] = []
        self.listeners: list[Callable[[str, int], None]] = []
        addr = 4 * GiB
        try:
            for dev_id, size in specs:
                ram = RamBlock(size, "anonymous", name=f"mem-{dev_id}")
                mr = MemoryRegion.new_ram(f"mem-{dev_id}", ram)
                vmem = VirtioMem(mr, addr=addr, id=dev_id, block_size=BS, policy=self.policy)
                vmem.add_config_change_notifier(lambda _d: self._wake.set())
                self.devs[dev_id] = Dev(vmem, ram, f"mem-{dev_id}")
                addr += size
        except BaseException:
            self._release()
            raise
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if guest:
            self._thread = threading.Thread(target=self._guest, name="fake-guest", daemon=True)
            self._thread.start()

    # -- the fake guest -------------------------------------------------------------------

    def _guest(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.05)
            self._wake.clear()
            progress = True
            while progress and not self._stop.is_set():
                progress = False
                for dev in list(self.devs.values()):
                    with self.lock:
                        progress |= self._step(dev)

    def _step(self, dev: Dev) -> bool:
        v = dev.vmem
        if v.plugged_size < v.requested_size:
            taken = set(dev.plugged)
            for i in range(v.usable_region_size // BS):
                gpa = v.addr + i * BS
                if gpa not in taken:
                    if v.plug(gpa, 1) is ResponseType.ACK:
                        dev.plugged.append(gpa)
                        return True
                    return False
        elif v.plugged_size > v.requested_size and dev.plugged:
            gpa = dev.plugged[-1]
            if v.unplug(gpa, 1) is ResponseType.ACK:
                dev.plugged.pop()
                return True
        return False

    def converged(self) -> bool:
        with self.lock:
            return all(d.vmem.plugged_size == d.vmem.requested_size for d in self.devs.values())

    # -- QmpBackend --------------------------------------------------------------------------

    def memory_devices(self) -> list[MemoryDeviceInfo]:
        self.calls.append("memory_devices")
        with self.lock:
            return [
                MemoryDeviceInfo(
                    id=i,
                    memaddr=d.vmem.addr,
                    requested_size=d.vmem.requested_size,
                    size=d.vmem.plugged_size,
                    max_size=d.vmem.region_size,
                    block_size=d.vmem.block_size,
                    memdev=d.memdev,
                    node=d.vmem.node,
                )
                for i, d in self.devs.items()
            ]

    def set_requested_size(self, device_id: str, size: int) -> None:
        self.calls.append(f"set_requested_size {device_id} {size}")
        with self.lock:
            self.devs[device_id].vmem.requested_size = size

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "plugged": sum(d.vmem.plugged_size for d in self.devs.values()),
                "devices": [
                    {"id": i, "size": d.vmem.plugged_size, "requested-size": d.vmem.requested_size}
                    for i, d in self.devs.items()
                ],
            }

    def migrate(self, uri: str) -> dict[str, Any]:
        raise QmpError("x-ramdiscard-migrate is unavailable: this test backend cannot migrate")

    def dump(self, path: str) -> dict[str, Any]:
        raise OSError(13, f"cannot write {path}")

    def add_size_change_listener(self, fn: Callable[[str, int], None]) -> Callable[[], None]:
        self.listeners.append(fn)
        for d in self.devs.values():
            d.vmem.add_size_change_notifier(fn)

        def remove() -> None:
            self.listeners.remove(fn)
            for d in self.devs.values():
                d.vmem.remove_size_change_notifier(fn)

        return remove

    def close(self) -> None:
        self.closed += 1
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._release()

    def _release(self) -> None:
        for d in list(self.devs.values()):
            for listener in d.vmem.listeners:
                d.vmem.unregister_listener(listener)
            d.vmem.unrealize()
            d.ram.close()
        self.devs.clear()


def run_with_server(
    backend: DeviceSetBackend,
    address: str,
    main: Callable[[QmpServer], Awaitable[Any]],
    timeout: float = 60.0,
) -> Any:
    """Start a QmpServer for ``backend`` on ``address``, run ``main(server)`` on the same
    event loop, then close the server (which closes the backend)."""

    async def wrapper() -> Any:
        server = QmpServer(backend, address)
        await server.start()
        try:
            return await asyncio.wait_for(main(server), timeout)
        finally:
            await server.close()

    return asyncio.run(wrapper())


@pytest.fixture
def sock_path(tmp_path: Path) -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    d = tmp_path if len(str(tmp_path)) < 80 else Path(os.path.realpath("/tmp"))
    path = str(d / f"qmp-{os.getpid()}-{id(d)}.sock")
    yield path
    with contextlib.suppress(OSError):
        os.unlink(path)


@pytest.fixture
def backend() -> Iterator[DeviceSetBackend]:
    b = DeviceSetBackend([("vm0", 64 * MiB), ("vm1", 32 * MiB)])
    yield b
    b.close()
