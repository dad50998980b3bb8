#!/usr/bin/env python3
"""Record virtio-mem traces from a real QEMU's own virtio-mem-pci device and a real guest.

Usage: record-qemu-traces.py OUT_DIR [SCENARIO ...]   (default: every scenario)

Each scenario starts the QEMU of scripts/build-qemu.sh (``find_qemu``; software
emulation) with QEMU's built-in ``virtio-mem-pci`` over a memory backend (ram, memfd or
file), boots the project's stock Debian kernel + busybox initramfs
(``ramdiscard.realguest.guestimage``; the guest's virtio_mem driver with its defaults,
memory onlined movable), changes ``requested-size`` over QMP and logs
``-trace virtio_mem_*`` (plus the ``ram_block_discard_range`` of the device's block and
``memory_device_*``, from which ``ramdiscard replay`` takes the geometry). The log is
trimmed to those lines and written to ``OUT_DIR/qemu10-<scenario>.log``. Every wait is
bounded; a scenario that times out stops with a one-line error.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ramdiscard.realguest.guestimage import guest_image
from ramdiscard.realguest.qemu import find_qemu
from ramdiscard.realguest.qmpclient import QmpClient
from ramdiscard.units import MiB

DEV = "/machine/peripheral/vmem0"
STEP_TIMEOUT = 240.0
KEEP = re.compile(r"^\d+@[\d.]+:(virtio_mem_\w+|memory_device_\w+|ram_block_discard_range)( |$)")


class Run:
    """One QEMU with a virtio-mem-pci device ``vmem0`` on memdev ``vmem0mem``."""

    def __init__(self, work: Path, *, backend: str, region: int, block: int, requested: int) -> None:
        self.work = work
        self.trace = work / "trace.log"
        self.serial = work / "serial.log"
        kernel, initramfs = guest_image()
        mem = {
            "ram": "memory-backend-ram,id=vmem0mem",
            "memfd": "memory-backend-memfd,id=vmem0mem",
            "file": f"memory-backend-file,id=vmem0mem,mem-path={work / 'vmem0.mem'},share=on",
        }[backend]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(work / "qmp.sock"))
        listener.listen(1)
        listener.settimeout(60)
        self.events: list[str] = []
        self.proc = subprocess.Popen(
            [
                str(find_qemu()), "-nodefaults", "-display", "none", "-no-user-config",
                "-machine", "q35", "-accel", "tcg", "-smp", "1", "-msg", "timestamp=on",
                "-m", f"512M,maxmem={512 * MiB + region + 1024 * MiB}",
                "-kernel", str(kernel), "-initrd", str(initramfs),
                "-append", "console=ttyS0 memhp_default_state=online_movable panic=-1 loglevel=4",
                "-object", f"{mem},size={region}",
                "-device", f"virtio-mem-pci,id=vmem0,memdev=vmem0mem,block-size={block},"
                f"requested-size={requested}",
                "-serial", f"file:{self.serial}",
                "-trace", "enable=virtio_mem_*", "-trace", "enable=memory_device_*",
                "-trace", "enable=ram_block_discard_range", "-D", str(self.trace),
                "-chardev", f"socket,id=qmp,path={work / 'qmp.sock'}", "-mon", "chardev=qmp,mode=control",
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(work / "qemu.err").open("wb"),
        )  # fmt: skip
        conn, _ = listener.accept()
        listener.close()
        self.qmp = QmpClient(conn, lambda name, _data: self.events.append(name))
        self.qmp.start(timeout=60)

    def size(self) -> int:
        return int(self.qmp.execute("qom-get", {"path": DEV, "property": "size"}))

    def set_requested(self, size: int) -> None:
        self.qmp.execute("qom-set", {"path": DEV, "property": "requested-size", "value": size})

    def wait(self, predicate: Callable[[], bool], what: str, timeout: float = STEP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"timed out waiting for {what} (plugged {self.size():#x})")
            time.sleep(0.02)

    def ready_count(self) -> int:
        with contextlib.suppress(OSError):
            return self.serial.read_text(errors="replace").count("RAMDISCARD-READY")
        return 0

    def settle(self, size: int) -> None:
        """Plugged size equals ``size`` and stays so for 2 s."""
        stable_since: list[float] = []

        def stable() -> bool:
            if self.size() != size:
                stable_since.clear()
                return False
            if not stable_since:
                stable_since.append(time.monotonic())
            return time.monotonic() - stable_since[0] >= 2.0

        self.wait(stable, f"plugged size {size:#x}")

    def reset(self) -> None:
        boots = self.ready_count()
        self.qmp.execute("system_reset")
        self.wait(lambda: self.ready_count() > boots, "the guest to boot again")

    def close(self) -> str:
        with contextlib.suppress(Exception):
            self.qmp.execute("quit", timeout=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.qmp.close()
        return self.trace.read_text(errors="replace")


@dataclass(frozen=True)
class Scenario:
    name: str
    backend: str
    region: int
    block: int
    requested: int
    steps: Callable[[Run], None]
    readme: str


def reset_while_plugging(r: Run) -> None:
    r.settle(0)
    r.set_requested(1536 * MiB)
    r.wait(lambda: r.size() > 0, "plugging to start")
    r.reset()
    r.settle(1536 * MiB)
    r.set_requested(512 * MiB)
    r.settle(512 * MiB)


def reset_while_unplugging(r: Run) -> None:
    r.settle(1024 * MiB)
    r.set_requested(0)
    r.wait(lambda: r.size() < 1024 * MiB, "unplugging to start")
    r.reset()
    r.settle(0)
    r.set_requested(256 * MiB)
    r.settle(256 * MiB)


def racing(r: Run) -> None:
    r.settle(256 * MiB)
    for size in (768, 128, 1024, 64, 512):
        r.set_requested(size * MiB)
    r.settle(512 * MiB)
    for size in (0, 896, 32, 384):
        r.set_requested(size * MiB)
    r.settle(384 * MiB)


def big_blocks(r: Run) -> None:
    r.settle(512 * MiB)
    for size in (1024, 256, 768):
        r.set_requested(size * MiB)
        r.settle(size * MiB)
    r.reset()
    r.settle(768 * MiB)
    r.set_requested(0)
    r.settle(0)


def racing_with_reset(r: Run) -> None:
    r.settle(128 * MiB)
    for size in (1024, 0, 640):
        r.set_requested(size * MiB)
    r.wait(lambda: r.size() not in (0, 128 * MiB), "the guest to follow")
    r.reset()
    r.settle(640 * MiB)
    r.set_requested(0)
    r.settle(0)


def reset_while_plugging_big(r: Run) -> None:
    r.settle(0)
    r.set_requested(2048 * MiB)
    r.wait(lambda: r.size() >= 256 * MiB, "plugging to be under way")
    r.reset()
    r.settle(2048 * MiB)
    r.set_requested(1024 * MiB)
    r.settle(1024 * MiB)


def racing_down_up(r: Run) -> None:
    r.settle(1536 * MiB)
    for size in (0, 1024, 256):
        r.set_requested(size * MiB)
    r.wait(lambda: r.size() < 1536 * MiB, "unplugging to start")
    for size in (1280, 512):
        r.set_requested(size * MiB)
    r.wait(lambda: r.size() != 512 * MiB, "the guest to follow")
    r.reset()
    r.settle(512 * MiB)


def double_reset(r: Run) -> None:
    r.settle(256 * MiB)
    r.set_requested(1024 * MiB)
    r.wait(lambda: r.size() > 256 * MiB, "plugging to start")
    boots = r.ready_count()
    r.qmp.execute("system_reset")
    r.qmp.execute("system_reset")
    r.wait(lambda: r.ready_count() > boots, "the guest to boot again")
    r.settle(1024 * MiB)
    r.set_requested(512 * MiB)
    r.settle(512 * MiB)


def flapping(r: Run) -> None:
    r.settle(0)
    for i in range(300):
        r.set_requested(1536 * MiB)
        time.sleep(0.002 * (i % 7))
        r.set_requested(128 * MiB)
        time.sleep(0.002 * (i % 5))
    r.settle(128 * MiB)


SCENARIOS = [
    Scenario("ram-2m-reset-while-plugging", "ram", 2048 * MiB, 2 * MiB, 0, reset_while_plugging,
             "memory-backend-ram 2 GiB, block 2 MiB, boot at 0: requested 1.5 GiB, system_reset "
             "while the guest plugs, re-plug after the reboot, lower to 512 MiB"),
    Scenario("memfd-2m-reset-while-unplugging", "memfd", 2048 * MiB, 2 * MiB, 1024 * MiB,
             reset_while_unplugging,
             "memory-backend-memfd 2 GiB, block 2 MiB, boot at 1 GiB: requested 0, system_reset "
             "while the guest unplugs, then 256 MiB"),
    Scenario("file-4m-racing-resizes", "file", 2048 * MiB, 4 * MiB, 256 * MiB, racing,
             "memory-backend-file 2 GiB, block 4 MiB, boot at 256 MiB: five and then four "
             "qom-set of requested-size in quick succession"),
    Scenario("ram-128m-resize-reset", "ram", 2048 * MiB, 128 * MiB, 512 * MiB, big_blocks,
             "memory-backend-ram 2 GiB, block 128 MiB, boot at 512 MiB: 1 GiB, 256 MiB, 768 MiB, "
             "system_reset, 0"),
    Scenario("memfd-4m-racing-reset", "memfd", 1024 * MiB, 4 * MiB, 128 * MiB, racing_with_reset,
             "memory-backend-memfd 1 GiB, block 4 MiB, boot at 128 MiB: racing resizes, "
             "system_reset while the guest follows them, then 0"),
    Scenario("file-128m-reset-while-plugging", "file", 2048 * MiB, 128 * MiB, 0, reset_while_plugging_big,
             "memory-backend-file 2 GiB, block 128 MiB, boot at 0: requested 2 GiB (the whole "
             "region), system_reset after 256 MiB are plugged, re-plug, lower to 1 GiB"),
    Scenario("memfd-2m-racing-down-up", "memfd", 2048 * MiB, 2 * MiB, 1536 * MiB, racing_down_up,
             "memory-backend-memfd 2 GiB, block 2 MiB, boot at 1.5 GiB: 0, 1 GiB, 256 MiB in quick "
             "succession, then 1.25 GiB, 512 MiB once the guest unplugs, system_reset"),
    Scenario("ram-2m-double-reset", "ram", 1024 * MiB, 2 * MiB, 256 * MiB, double_reset,
             "memory-backend-ram 1 GiB, block 2 MiB, boot at 256 MiB: requested 1 GiB, two "
             "system_reset back to back while the guest plugs, re-plug, lower to 512 MiB"),
    Scenario("ram-2m-flapping", "ram", 2048 * MiB, 2 * MiB, 0, flapping,
             "memory-backend-ram 2 GiB, block 2 MiB, boot at 0: requested-size flaps between "
             "1.5 GiB and 128 MiB 300 times (0-12 ms apart) while the guest plugs, then settles at 128 MiB"),
]  # fmt: skip


def trim(text: str) -> str:
    """Only the replayable lines; discards only of the device's RAM block."""
    out = []
    for line in text.splitlines():
        if not KEEP.match(line):
            continue
        if ":ram_block_discard_range " in line:
            block = line.split(":ram_block_discard_range ", 1)[1].split("@", 1)[0]
            if block and not block.endswith("vmem0mem"):
                continue
        out.append(line + "\n")
    return "".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    argv_keep = "--keep" in argv
    wanted = set(argv[1:]) - {"--keep"}
    for sc in SCENARIOS:
        if wanted and sc.name not in wanted:
            continue
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="record-trace-") as tmp:
            run = Run(Path(tmp), backend=sc.backend, region=sc.region, block=sc.block, requested=sc.requested)
            try:
                sc.steps(run)
            finally:
                text = run.close()
                if argv_keep:
                    for f in Path(tmp).iterdir():
                        if f.is_file():
                            (out_dir / f"{sc.name}.{f.name}").write_bytes(f.read_bytes())
            target = out_dir / f"qemu10-{sc.name}.log"
            target.write_text(trim(text))
        lines = target.read_text().count("\n")
        print(f"{target}: {lines} lines in {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
