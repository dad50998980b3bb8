"""``ramdiscard migrate send|receive``: migrate a demo guest between two processes.

Both sides build the same machine (``--size`` of virtio-mem RAM with ``--block-size``
blocks on ``--backing`` memory, plus ``--low`` of plain RAM). The sender plugs
``--plugged`` bytes in a fragmented pattern, writes content derived from ``--seed`` and
migrates; the receiver loads and checks every plugged block against the same pattern,
and that nothing outside the plugged blocks is resident. Progress is a rich bar on
stderr unless ``--quiet``; ``--json`` prints the statistics.

``receive --scenario FILE`` receives into a scenario machine instead (the destination of
QMP ``x-ramdiscard-migrate tcp:`` from ``ramdiscard serve FILE``): the stream is checked
against that machine's geometry, content is not compared. ``--timeout`` bounds the wait
for the peer and every read or send after it (default :data:`IO_TIMEOUT` for those).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict

from ramdiscard.cli.migrate_live import add_live_options
from ramdiscard.migration.progress import Progress, ProgressFn
from ramdiscard.migration.source import MigrationStats
from ramdiscard.migration.transport import IO_TIMEOUT
from ramdiscard.units import GiB, MiB, format_size, parse_size


class DemoGuest:
    """The machine of both sides; see the module docstring."""

    def __init__(self, size: int, block: int, backing: str, low: int) -> None:
        from ramdiscard.hostmem import RamBlock
        from ramdiscard.memory import AddressSpace, MemoryRegion
        from ramdiscard.providers.virtio_mem import VirtioMem
        from ramdiscard.rdm import DiscardPolicy

        self.block = block
        self.ram = RamBlock(size, backing, name="vmem0-ram")
        self.low = RamBlock(low, backing, name="pc.ram") if low else None
        mr = MemoryRegion.new_ram("vmem0-ram", self.ram)
        self.dev = VirtioMem(
            mr, id="vmem0", addr=4 * GiB, block_size=block, requested_size=size, policy=DiscardPolicy()
        )
        self.root = MemoryRegion.new_container("system", 4 * GiB + size)
        if self.low is not None:
            self.root.add_subregion(0, MemoryRegion.new_ram("pc.ram", self.low))
        self.root.add_subregion(4 * GiB, self.dev.device_region)
        self.space = AddressSpace("system", self.root)

    def plug_fragmented(self, plugged: int) -> None:
        """Plug runs of 1, 2, 3, ... blocks separated by one-block holes until ``plugged``."""
        want = plugged // self.block
        nblocks = self.dev.region_size // self.block
        b, run = 0, 1
        while want and b < nblocks:
            n = min(run, want, nblocks - b)
            if self.dev.plug(self.dev.addr + b * self.block, n).name != "ACK":
                raise RuntimeError("plug refused")
            want -= n
            b += n + 1
            run = run % 7 + 1
        if want:
            raise ValueError(
                f"cannot plug {format_size(plugged)} fragmented into {format_size(self.dev.region_size)}"
            )

    def fill(self, seed: int) -> None:
        for start, size in self.dev.plugged_ranges():
            for off in range(start, start + size, self.block):
                self.ram.view[off : off + self.block] = _block_content(seed, off, self.block)
        if self.low is not None:
            self.low.view[:] = _block_content(seed, -1, self.low.size)

    def verify(self, seed: int) -> int:
        """Number of plugged blocks whose content differs from the pattern."""
        bad = 0
        for start, size in self.dev.plugged_ranges():
            for off in range(start, start + size, self.block):
                want = zlib.crc32(_block_content(seed, off, self.block))
                bad += zlib.crc32(self.ram.view[off : off + self.block]) != want
        if self.low is not None:
            bad += zlib.crc32(self.low.view) != zlib.crc32(_block_content(seed, -1, self.low.size))
        return bad

    def resident_outside(self) -> int:
        return sum(self.ram.resident_bytes(s, e - s) for s, e in self.dev.discarded_runs())


def _block_content(seed: int, offset: int, size: int) -> bytes:
    import numpy as np

    base = (seed * 0x100000001B3 + offset) & (2**63 - 1)
    words = np.arange(size // 8, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(base)
    return words.tobytes()


@contextmanager
def _progress_bar(quiet: bool, label: str) -> Iterator[ProgressFn | None]:
    if quiet:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    with Bar(
        TextColumn(label),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TextColumn("{task.fields[pages]} pages"),
        transient=False,
    ) as bar:
        task = bar.add_task(label, total=None, pages=0)

        def update(p: Progress) -> None:
            bar.update(task, completed=p.bytes_done, total=p.bytes_total or None, pages=p.pages_done)

        yield update


def _report(args: argparse.Namespace, role: str, stats: MigrationStats, extra: dict[str, object]) -> None:
    row = {"role": role, **asdict(stats), "rate_bytes_per_s": stats.rate, **extra}
    if args.json:
        print(json.dumps(row))
    else:
        print(
            f"{role}: {format_size(stats.page_bytes)} in {stats.page_sections} page sections, "
            f"{stats.seconds:.3f} s ({stats.rate / MiB:.0f} MiB/s)"
            + "".join(f", {k} {v}" for k, v in extra.items())
        )


def _send(args: argparse.Namespace) -> int:
    from ramdiscard.cli.migrate_live import check_live_args
    from ramdiscard.migration.tcp import migrate_to

    problem = check_live_args(args)
    if problem is None and args.scenario is not None and not args.live:
        problem = "send --scenario needs --live"
    if problem is not None:
        print(f"ramdiscard migrate send: error: {problem}", file=sys.stderr)
        return 2
    if args.live:
        return _send_live(args)
    guest = DemoGuest(args.size, args.block_size, args.backing, args.low)
    guest.plug_fragmented(args.plugged)
    guest.fill(args.seed)
    with _progress_bar(args.quiet or args.json, "migrating") as fn:
        stats = migrate_to(
            args.host,
            args.port,
            guest.space,
            [guest.dev],
            progress=fn,
            timeout=args.timeout or IO_TIMEOUT,
            io_timeout=args.timeout or IO_TIMEOUT,
        )
    free = next(iter(guest.dev.discarded_runs()), None)
    after = guest.dev.plug(guest.dev.addr + free[0], 1).name if free is not None else "n/a"
    _report(args, "source", stats, {"plug_after_migration": after})
    return 0


def _send_live(args: argparse.Namespace) -> int:
    from ramdiscard.cli.migrate_live import Side, send_live
    from ramdiscard.guest.writer import DeviceTarget, GuestWriter

    timeout = args.timeout or IO_TIMEOUT
    if args.scenario is not None:
        from ramdiscard.machine import Machine, load_scenario

        machine = Machine.from_scenario(load_scenario(args.scenario))
        try:
            machine.start()
            machine.wait_converged(60)
            devices, consumers = list(machine.devices.values()), list(machine.consumers)
            side = Side(machine.space_or_fail(), devices, machine.lock, machine.writer, consumers)
            return send_live(args, side, timeout)
        finally:
            machine.close()
    guest = DemoGuest(args.size, args.block_size, args.backing, args.low)
    guest.plug_fragmented(args.plugged)
    guest.fill(args.seed)
    lock = threading.RLock()
    writer = GuestWriter(
        [DeviceTarget(guest.dev, guest.ram)], lock, rate=args.write_rate or 0, pattern=args.write_pattern,
        seed=args.seed,
    )  # fmt: skip
    writer.start()
    try:
        return send_live(args, Side(guest.space, [guest.dev], lock, writer), timeout)
    finally:
        writer.stop()


def _receive_live(args: argparse.Namespace) -> int:
    from ramdiscard.cli.migrate_live import Side, receive_live_cli

    if args.scenario is not None:
        from ramdiscard.machine import Machine, load_scenario

        machine = Machine.from_scenario(load_scenario(args.scenario))
        try:
            devices = list(machine.devices.values())
            side = Side(machine.space_or_fail(), devices, machine.lock, None, list(machine.consumers))
            with _listen(args) as ls:
                receive_live_cli(args, side, ls, dict)
        finally:
            machine.close()
        return 0
    guest = DemoGuest(args.size, args.block_size, args.backing, args.low)
    with _listen(args) as ls:
        row = receive_live_cli(
            args, Side(guest.space, [guest.dev], threading.RLock()), ls,
            lambda: {"resident_outside_plugged": guest.resident_outside()},
        )  # fmt: skip
    return 1 if row["resident_outside_plugged"] else 0


def _listen(args: argparse.Namespace) -> socket.socket:
    ls = socket.create_server((args.host, args.port))
    if args.port == 0 or not args.quiet:
        print(f"listening on {ls.getsockname()[0]}:{ls.getsockname()[1]}", file=sys.stderr, flush=True)
    return ls


def _receive_scenario(args: argparse.Namespace) -> int:
    from ramdiscard.machine import Machine, load_scenario
    from ramdiscard.migration.tcp import receive_from

    machine = Machine.from_scenario(load_scenario(args.scenario))
    try:
        with _listen(args) as ls, _progress_bar(args.quiet or args.json, "receiving") as fn:
            stats = receive_from(
                ls,
                machine.space_or_fail(),
                list(machine.devices.values()),
                progress=fn,
                accept_timeout=args.timeout,
                read_timeout=args.timeout or IO_TIMEOUT,
            )
        plugged = sum(d.plugged_size for d in machine.devices.values())
        _report(args, "destination", stats, {"plugged": plugged})
    finally:
        machine.close()
    return 0


def _receive(args: argparse.Namespace) -> int:
    from ramdiscard.migration.tcp import receive_from

    if args.live:
        return _receive_live(args)
    if args.scenario is not None:
        return _receive_scenario(args)
    guest = DemoGuest(args.size, args.block_size, args.backing, args.low)
    with _listen(args) as ls, _progress_bar(args.quiet or args.json, "receiving") as fn:
        stats = receive_from(
            ls,
            guest.space,
            [guest.dev],
            progress=fn,
            accept_timeout=args.timeout,
            read_timeout=args.timeout or IO_TIMEOUT,
        )
    bad = guest.verify(args.seed)
    outside = guest.resident_outside()
    _report(args, "destination", stats, {"bad_blocks": bad, "resident_outside_plugged": outside})
    return 1 if bad or outside else 0


_DESCRIPTIONS = {
    "send": "Build the demo guest, plug --plugged bytes fragmented, write a pattern from --seed and "
    "migrate it to a receiver at --host:--port. Exit 0 when the receiver accepted the stream.",
    "receive": "Build the same demo guest (same --size, --block-size, --backing, --low), listen, "
    "load one migration and check every plugged block against the --seed pattern and that nothing "
    "outside the plugged blocks is resident. Exit 0 when all is intact, 1 otherwise.",
}


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="ramdiscard migrate", description=__doc__)
    sub = parser.add_subparsers(dest="migrate_command", metavar="send|receive", required=True)
    for name, help_ in (("send", "migrate a demo guest to a listening receiver"), ("receive", "receive one")):
        p = sub.add_parser(name, help=help_, description=_DESCRIPTIONS[name])
        p.add_argument(
            "--host",
            default="127.0.0.1",
            help="send: the receiver's address; receive: the address to listen on (default 127.0.0.1)",
        )
        p.add_argument(
            "--port",
            type=int,
            required=name == "send",
            default=0,
            help="send: the receiver's port (required); receive: the port to listen on (default 0: any, "
            "printed on stderr)",
        )
        p.add_argument(
            "--size", type=_size, default=parse_size("1G"), metavar="SIZE", help="virtio-mem region size (1G)"
        )
        p.add_argument(
            "--block-size", type=_size, default=parse_size("2M"), metavar="SIZE", help="block size (2M)"
        )
        p.add_argument(
            "--backing", choices=["anonymous", "memfd"], default="anonymous", help="guest memory (anonymous)"
        )
        p.add_argument(
            "--low",
            type=_size,
            default=parse_size("16M"),
            metavar="SIZE",
            help="plain RAM at 0 (16M; 0: none)",
        )
        p.add_argument("--seed", type=int, default=1, help="content pattern seed; both sides must agree (1)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--json", action="store_true", help="print the statistics as one JSON line")
        if name == "send":
            p.add_argument(
                "--plugged",
                type=_size,
                default=parse_size("256M"),
                metavar="SIZE",
                help="memory to plug, fragmented, before migrating (256M)",
            )
            p.add_argument(
                "--timeout",
                type=float,
                default=None,
                help=f"seconds the receiver may stay silent or not read before failing ({IO_TIMEOUT:g})",
            )
            p.add_argument(
                "--scenario",
                metavar="FILE",
                default=None,
                help="--live: migrate this scenario's machine (its consumers, guest and [workload] "
                "writer) instead of the demo guest",
            )
            add_live_options(p, True, _size)
            p.set_defaults(migrate_func=_send)
        else:
            p.add_argument(
                "--timeout",
                type=float,
                default=None,
                help="seconds to wait for the sender (default: forever), and of silence from it "
                f"once connected before failing (default {IO_TIMEOUT:g})",
            )
            p.add_argument(
                "--scenario",
                metavar="FILE",
                default=None,
                help="receive into this scenario's machine (from QMP x-ramdiscard-migrate tcp:) "
                "instead of the demo guest",
            )
            add_live_options(p, False, _size)
            p.set_defaults(migrate_func=_receive)
    return parser


def run(args: argparse.Namespace) -> int:
    """For a parent CLI that added :func:`build_parser`'s subcommands itself."""
    return int(args.migrate_func(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)
