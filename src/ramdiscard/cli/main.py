"""Entry point of the ``ramdiscard`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ramdiscard.errors import RamDiscardError


def _demo(args: argparse.Namespace) -> int:
    from ramdiscard.cli.demo import run_demo

    return run_demo(args)


def _bench(args: argparse.Namespace) -> int:
    from ramdiscard.cli.bench import collect, render

    rows = collect(quick=args.quick, only=args.only or None)
    print(render(rows, args.json))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ramdiscard",
        description="QEMU's RamDiscardManager system on real host memory: sparse guest RAM "
        "(virtio-mem), DMA pinning that follows it, migration and dumps that skip discarded memory.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", help="run the main scenario and show what coordination buys")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON")
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="run every benchmark and print ratios against raw baselines")
    bench.add_argument("--json", action="store_true", help="print rows as JSON")
    bench.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions")
    bench.add_argument(
        "--only", action="append", metavar="AREA", help="only modules whose name contains AREA"
    )
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (RamDiscardError, ValueError, OSError) as exc:
        print(f"ramdiscard: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ramdiscard: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
