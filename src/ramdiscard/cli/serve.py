"""``ramdiscard serve SCENARIO.toml --qmp ADDRESS``: build a scenario's machine and serve QMP
for it until ``quit`` or SIGINT/SIGTERM (exit 130). See ``docs/qmp.md``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ramdiscard.errors import RamDiscardError
from ramdiscard.machine import Machine, load_scenario
from ramdiscard.migration.transport import IO_TIMEOUT
from ramdiscard.qmp import parse_address, serve


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``ramdiscard serve`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="ramdiscard serve", description=serve_help())
    p.add_argument("scenario", metavar="SCENARIO.toml", help="the machine to run")
    p.add_argument(
        "--qmp",
        required=True,
        metavar="ADDRESS",
        help="where to serve QMP: unix:PATH (mode 0600) or tcp:HOST:PORT (use a loopback host)",
    )
    p.add_argument("--workdir", metavar="DIR", help="where file-backed guest memory goes")
    p.add_argument(
        "--incoming",
        metavar="URI",
        help="be a migration destination: tcp:HOST:PORT listens at once, 'defer' waits for "
        "QMP migrate-incoming; the guest starts once the migration completed",
    )
    p.add_argument("-S", dest="paused", action="store_true", help="do not start the guest (QMP cont does)")
    p.add_argument(
        "--migrate-timeout",
        type=float,
        default=IO_TIMEOUT,
        metavar="SECONDS",
        help="x-ramdiscard-migrate tcp: fails after this long without the destination reading "
        f"({IO_TIMEOUT:g})",
    )
    return p


def serve_help() -> str:
    return "run a scenario's machine and serve QMP (qemu.qmp, qmp-shell) until 'quit'"


def run_from_args(args: argparse.Namespace) -> int:
    """Build the scenario's machine and serve it (for the ``ramdiscard`` CLI)."""
    parse_address(args.qmp)  # a bad address fails before any memory is taken
    scenario = load_scenario(args.scenario)
    from ramdiscard.qmp.migration_commands import LiveMachineBackend

    machine = Machine.from_scenario(scenario, workdir=args.workdir)
    try:
        backend = LiveMachineBackend(
            machine, migrate_timeout=args.migrate_timeout, incoming=args.incoming, start_paused=args.paused
        )
        if args.incoming is None:
            machine.start()
            if args.paused:
                backend.run_state = "paused"
                if machine.writer is not None:
                    machine.writer.pause()
    except BaseException:
        machine.close()
        raise
    return serve(backend, args.qmp, migrate_timeout=args.migrate_timeout)


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``ramdiscard serve SCENARIO.toml --qmp unix:PATH`` as a standalone entry point."""
    args = build_parser().parse_args(argv)
    try:
        return run_from_args(args)
    except (RamDiscardError, ValueError, OSError) as exc:
        print(f"ramdiscard serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
