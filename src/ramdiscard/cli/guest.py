"""``ramdiscard guest``: boot a real Linux guest whose virtio-mem device is ramdiscard's,
and serve ramdiscard's QMP for it (qom-set requested-size, query-memory-devices,
x-ramdiscard-status) until ``quit`` or Ctrl-C. The guest's console goes to stderr with
``--console``; the device event log is written to ``--trace`` at the end (replayable with
``ramdiscard replay``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
from typing import Any

from ramdiscard.fileio import check_output, create_output
from ramdiscard.providers.virtio_mem import VirtioMem


class GuestMachine:
    """A :class:`~ramdiscard.realguest.launcher.RealGuest` as the machine QMP serves."""

    def __init__(self, guest: Any) -> None:
        self.guest = guest
        self.lock: threading.RLock = guest.lock
        self.devices: dict[str, VirtioMem] = {"vmem0": guest.device}

    @property
    def space(self) -> Any:
        return self.guest.space

    def set_requested_size(self, dev_id: str, size: int) -> None:
        if dev_id not in self.devices:
            raise KeyError(dev_id)
        self.guest.set_requested_size(size)

    def _qemu(self, command: str) -> None:
        from ramdiscard.realguest.qmpclient import QmpClientError

        qmp = self.guest.qmp
        if qmp is None:
            raise QmpClientError(f"{command}: QEMU's QMP connection is closed")
        qmp.execute(command)

    def system_reset(self) -> None:
        """QEMU resets the machine; its RESET event (read before QEMU's answer) has
        unplugged the device by the time this returns, and the guest reboots."""
        self._qemu("system_reset")

    def stop(self) -> None:
        """QEMU stops the vCPUs (``stop``)."""
        self._qemu("stop")

    def start(self) -> None:
        """QEMU runs the vCPUs (``cont``; a no-op when they already run)."""
        self._qemu("cont")

    def status(self) -> dict[str, Any]:
        """The guest's latest MemTotal (None before it reported one or while no QEMU
        runs), this process's VmPin above its start, the device region's resident bytes
        in the memfd, whether the running QEMU maps that very memfd (same st_dev and
        st_ino over the device region), and the device."""
        from ramdiscard.realguest.launcher import RealGuestError

        g = self.guest
        running = g.qemu_running
        memtotal: int | None = None
        if running:
            with contextlib.suppress(RealGuestError):
                memtotal = g.guest_memtotal()
        s = g.sizes(memtotal=memtotal or 0)
        return {
            "qemu_running": running,
            "qemu_boots": g.boots,
            "guest_memtotal": memtotal,
            "vm_pin": s.vm_pin,
            "memfd_resident": s.resident,
            "memfd_shared_with_qemu": g.qemu_maps_memfd() if running else None,
            "devices": {
                "vmem0": {
                    "plugged_size": g.device.plugged_size,
                    "requested_size": g.device.requested_size,
                    "broken": g.device.broken,
                    "pinned_bytes": g.pinned_bytes,
                }
            },
        }

    def close(self) -> None:
        self.guest.close()


def run_guest(args: argparse.Namespace) -> int:
    from ramdiscard.qmp import serve
    from ramdiscard.realguest.launcher import RealGuest

    def echo(line: str) -> None:
        print(f"guest: {line}", file=sys.stderr, flush=True)

    if args.trace:
        check_output(args.trace, "trace")  # refused before a guest is booted
    guest = RealGuest(
        region_size=args.region_size,
        requested_size=args.requested_size,
        on_console=echo if args.console else None,
    )
    try:
        return serve(GuestMachine(guest), args.qmp)
    finally:
        try:
            if args.trace:
                with create_output(args.trace, "trace", durable=False) as f:
                    f.write(guest.trace.text().encode())
        finally:
            guest.close()
