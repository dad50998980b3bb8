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
    machine = Machine.from_scenario(scenario, workdir=args.workdir)
    return serve(machine, args.qmp, migrate_timeout=args.migrate_timeout)


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
