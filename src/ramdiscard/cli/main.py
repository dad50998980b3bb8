"""Entry point of the ``ramdiscard`` command.

Rules: every error the user can cause (bad arguments, bad scenario, bad trace, host
refusal) ends with one line ``ramdiscard: error: ...`` on stderr and exit status 1 (2 for
argument errors, 130 for Ctrl-C / SIGTERM); no traceback. SIGINT and SIGTERM are turned
into KeyboardInterrupt (:mod:`ramdiscard.interrupts`) so every ``finally`` runs, and are held
off while a machine releases its resources, so no pin, mapping or file outlives the
command whatever signals arrive.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from ramdiscard import interrupts
from ramdiscard.cli import extras
from ramdiscard.errors import RamDiscardError
from ramdiscard.units import format_size, parse_size


def size_arg(text: str) -> int:
    """argparse type for sizes: "2M", "4G", "0x1000", bytes."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def fraction_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number in [0, 1]") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {text!r}: expected a number in [0, 1]")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _demo(args: argparse.Namespace) -> int:
    from ramdiscard.cli.demo import run_demo

    return run_demo(args)


def _run(args: argparse.Namespace) -> int:
    from ramdiscard.cli.run import run_scenario

    return run_scenario(args)


def _replay(args: argparse.Namespace) -> int:
    from ramdiscard.cli.replay import run_replay

    return run_replay(args)


def _serve(args: argparse.Namespace) -> int:
    from ramdiscard.cli.serve import run_from_args

    return run_from_args(args)


def _migrate(args: argparse.Namespace) -> int:
    from ramdiscard.cli.migrate import run

    return run(args)


def _top(args: argparse.Namespace) -> int:
    from ramdiscard.cli.top import run

    return run(args)


def _guest(args: argparse.Namespace) -> int:
    from ramdiscard.cli.guest import run_guest

    return run_guest(args)


def _dump(args: argparse.Namespace) -> int:
    from ramdiscard.cli.run import run_dump

    return run_dump(args)


def _bench(args: argparse.Namespace) -> int:
    from ramdiscard.cli.bench import collect, failed, render

    rows = collect(quick=args.quick, only=args.only or None)
    print(render(rows, args.json))
    bad = failed(rows)
    for r in bad:
        print(f"ramdiscard: error: bench group {r['group']} failed: {r['failed']}", file=sys.stderr)
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ramdiscard",
        description="QEMU's RamDiscardManager system on real host memory: sparse guest RAM "
        "(virtio-mem), DMA pinning that follows it, KVM memslots, QEMU trace replay. "
        "Sizes accept binary suffixes: 512M, 2G, 0x1000.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="show what coordination buys: a VM with virtio-mem and a pinning device, with and without",
        description="Run the main scenario twice on real memory: boot RAM + a virtio-mem region with a "
        "vfio-style container pinning guest memory (io_uring), the Linux driver model following "
        "requested sizes 0 -> 4G -> 1G -> 6G -> 0 (scaled to --region-size). Once with the container "
        "following the RamDiscardManager, once pinning whole regions. Prints a table per run and "
        "writes a plot.",
    )
    demo.add_argument("--region-size", type=size_arg, default=16 << 30, metavar="SIZE",
                      help="virtio-mem region size (default 16G; requested sizes scale with it)")  # fmt: skip
    demo.add_argument(
        "--boot-ram", type=size_arg, default=1 << 30, metavar="SIZE", help="boot RAM (default 1G)"
    )
    demo.add_argument("--block-size", type=size_arg, default=2 << 20, metavar="SIZE",
                      help="virtio-mem block size (default 2M)")  # fmt: skip
    demo.add_argument("--touch", type=fraction_arg, default=0.25, metavar="FRACTION",
                      help="fraction of plugged memory the guest writes (default 0.25)")  # fmt: skip
    demo.add_argument("--backend", choices=("auto", "io_uring", "mlock", "null"), default="auto",
                      help="how the container pins (default: io_uring, else mlock)")  # fmt: skip
    demo.add_argument("--skip-uncoordinated", action="store_true", help="only run the coordinated case")
    demo.add_argument("--plot", metavar="PATH", help="PNG to write (default out/ramdiscard-demo.png or ./)")
    demo.add_argument("--no-plot", action="store_true", help="do not write a plot")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    demo.add_argument("--quiet", action="store_true", help="no progress display")
    demo.set_defaults(func=_demo)

    run = sub.add_parser(
        "run",
        help="run a scenario file (TOML): devices, consumers, steps; print figures per step",
        description="Build the machine a scenario describes (boot RAM, virtio-mem devices, vfio "
        "containers, KVM memslots, block DMA mappers), run its steps (resize, unplug-all, "
        "system-reset, pause, snapshot, restore, migrate, live-migrate, dump) with the guest driver "
        "model and print plugged, guest-touched, resident, VmPin, DMA mappings, memslots and "
        "requests per step. A file with a [guest] table boots a real Linux guest under QEMU instead (resize, "
        "system-reset, run, wait; guest MemTotal, plugged, VmPin and memfd resident per step; "
        "needs scripts/build-qemu.sh once). See docs/cli.md for the format and examples/*.toml.",
    )
    run.add_argument("scenario", metavar="SCENARIO.toml", help="the scenario file (see docs/cli.md)")
    run.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    run.add_argument("--check", action="store_true", help="only validate the scenario")
    run.add_argument("--workdir", metavar="DIR", help="where file-backed memory is created (default: a "
                     "temporary directory in /dev/shm, removed at exit)")  # fmt: skip
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--console", action="store_true", help="real guest: copy its serial console to stderr")
    run.set_defaults(func=_run)

    replay = sub.add_parser(
        "replay",
        help="replay a QEMU virtio-mem trace through the device and consumers; report limits",
        description="Replay a QEMU trace log (-trace virtio_mem_* -trace ram_block_discard_range "
        "-trace memory_device_*) through the device model and a consumer. Reports responses that "
        "differ from QEMU's, peak pinned memory, peak DMA mappings against the limit (and the "
        "smallest block size that stays under it), and memslot counts.",
    )
    replay.add_argument("trace", metavar="TRACE", help="a QEMU trace log")
    replay.add_argument("--consumer", choices=("vfio", "kvm", "none"), default="vfio",
                        help="who listens to the device memory (default vfio)")  # fmt: skip
    replay.add_argument("--backend", choices=("null", "io_uring", "mlock"), default="null",
                        help="how vfio pins: null = bookkeeping only (default), "
                        "io_uring/mlock = real")  # fmt: skip
    replay.add_argument(
        "--block-size", type=size_arg, metavar="SIZE", help="device block size (default: inferred)"
    )
    replay.add_argument(
        "--region-size", type=size_arg, metavar="SIZE", help="region size (default: inferred)"
    )
    replay.add_argument("--addr", type=size_arg, metavar="ADDR", help="region address (default: inferred)")
    replay.add_argument("--dma-limit", type=int, default=65535, metavar="N",
                        help="vfio DMA mapping limit (default 65535)")  # fmt: skip
    replay.add_argument("--max-memslots", type=int, default=32764, metavar="N",
                        help="KVM memslots QEMU reserves in the DMA check (default 32764)")  # fmt: skip
    replay.add_argument("--dynamic-memslots", action="store_true", help="device with dynamic memslots")
    replay.add_argument("--memslot-limit", type=int, default=0, metavar="N", help="memslot limit (0: none)")
    replay.add_argument("--json", action="store_true", help="print the report as JSON")
    replay.add_argument("--plot", metavar="FILE.png", help="also draw requested, plugged, usable region, "
                        "pinned bytes and DMA mappings over the trace (needs the 'cli' extra)")  # fmt: skip
    replay.set_defaults(func=_replay)

    from ramdiscard.cli import top as top_cli

    top = sub.add_parser(
        "top",
        help="live view of a VM's virtio-mem devices over QMP (ramdiscard serve or QEMU)",
        description="Connect to a QMP server (ramdiscard serve, or QEMU's -qmp) and show, refreshed "
        "live, every virtio-mem device (requested, plugged, usable region, block size) and "
        "MEMORY_DEVICE_SIZE_CHANGE events as they arrive; where the server offers "
        "x-ramdiscard-status, also pinned bytes, DMA mappings, memslots and migration progress. "
        "q or Ctrl-C quits. Needs the 'cli' extra.",
    )
    top_cli.build_parser(top)
    top.set_defaults(func=_top)

    from ramdiscard.cli import migrate as migration_cli
    from ramdiscard.cli import serve as serve_cli

    serve = sub.add_parser(
        "serve",
        help=serve_cli.serve_help(),
        description="Build a scenario's machine, run its guest in the background and serve QMP "
        "(qemu.qmp, qmp-shell) on a unix socket or a loopback TCP port until a client sends "
        "'quit' (or SIGINT/SIGTERM). Steps of the scenario are not run: a QMP client drives the "
        "machine (qom-set requested-size, query-memory-devices, x-ramdiscard-status, "
        "x-ramdiscard-migrate, x-ramdiscard-dump). See docs/qmp.md.",
    )
    serve_cli.build_parser(serve)
    serve.set_defaults(func=_serve)

    guest = sub.add_parser(
        "guest",
        help="boot a real Linux guest (QEMU, TCG) driving ramdiscard's virtio-mem over vhost-user",
        description="Boot a stock Debian Linux guest under QEMU (software emulation) whose "
        "virtio-mem device is served by this process over vhost-user, and serve ramdiscard's "
        "QMP for it until 'quit'. Needs the QEMU of scripts/build-qemu.sh (or $RAMDISCARD_QEMU).",
    )
    guest.add_argument(
        "--requested-size", type=size_arg, default=512 * 1024 * 1024, metavar="SIZE",
        help="virtio-mem requested-size at boot (default 512M)",
    )  # fmt: skip
    guest.add_argument(
        "--region-size", type=size_arg, default=2 * 1024**3, metavar="SIZE",
        help="device region at GPA 4G, hidden from the guest's RAM by memmap= (default 2G)",
    )  # fmt: skip
    guest.add_argument("--qmp", default="unix:ramdiscard-guest.qmp", help="QMP address (unix:PATH)")
    guest.add_argument("--console", action="store_true", help="echo the guest console to stderr")
    guest.add_argument("--trace", metavar="FILE", help="write the device event log (replayable) here")
    guest.set_defaults(func=_guest)

    migrate = sub.add_parser(
        "migrate",
        help="migrate a demo guest between two processes over TCP (send | receive)",
        description="Live-migration style transfer of a virtio-mem guest between two ramdiscard "
        "processes: only plugged memory is sent, the receiver checks every block's content and "
        "that nothing outside the plugged blocks became resident. Start 'receive' first, then "
        "'send' to its port. See docs/migration-format.md.",
    )
    migration_cli.build_parser(migrate)
    migrate.set_defaults(func=_migrate)

    dump = sub.add_parser(
        "dump",
        help="run a scenario's steps, then write an ELF core of the populated guest memory",
        description="Build the scenario's machine, run its steps, and write the guest memory "
        "(QEMU's dump-guest-memory) to OUT.elf: one PT_LOAD per populated guest-physical run, so "
        "unplugged memory is neither read nor written. Readable with readelf, gdb, crash, "
        "pyelftools.",
    )
    dump.add_argument("scenario", metavar="SCENARIO.toml", help="the scenario whose steps run first")
    dump.add_argument("output", metavar="OUT.elf", help="the core file to write (mode 0600)")
    dump.add_argument("--workdir", metavar="DIR", help="where file-backed guest memory is created")
    dump.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    dump.set_defaults(func=_dump)

    bench = sub.add_parser(
        "bench",
        help="run every benchmark and print ratios against raw baselines",
        description="Run the benchmark of every area; each row compares our code with a raw "
        "baseline measured in the same run (ratio = ours / raw).",
    )
    bench.add_argument("--json", action="store_true", help="print rows as JSON")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    bench.add_argument(
        "--only", action="append", metavar="AREA", help="only modules whose name contains AREA"
    )
    bench.set_defaults(func=_bench)
    return parser


def needs(args: argparse.Namespace) -> list[str]:
    """Import names of the ``cli`` extra the parsed command will use."""
    cmd = args.command
    if cmd == "demo":
        return ["rich"] + ([] if args.no_plot else ["matplotlib"])
    if cmd == "run":
        return [] if args.check else ["rich"]
    if cmd == "migrate":
        return ["rich"]
    if cmd == "replay":
        return ["matplotlib"] if args.plot else []
    if cmd == "top":
        return ["qemu.qmp"] + ([] if args.once and args.json else ["rich"])
    if cmd == "bench":
        return [] if args.json else ["rich"]
    return []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    restore_signals = interrupts.install()
    try:
        extras.require(f"ramdiscard {args.command}", needs(args))
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        hint = extras.hint_for(exc)
        if hint is None:
            raise
        print(f"ramdiscard: error: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ramdiscard: interrupted; everything released", file=sys.stderr)
        return 130
    except (RamDiscardError, ValueError, OSError, KeyError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        print(f"ramdiscard: error: {' '.join(msg.split())}", file=sys.stderr)
        return 1
    finally:
        restore_signals()


__all__ = ["build_parser", "format_size", "main", "size_arg"]

if __name__ == "__main__":
    sys.exit(main())
