"""``python -m ramdiscard.fuzz``: run fuzz targets (or the stress run) for a time budget.

Exit status: 0 when nothing was found, 1 on any finding (crash or invariant violation),
2 on a usage error. With several targets the budget is split evenly between them.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

from ramdiscard.fuzz.engine import Target, fuzz, replay
from ramdiscard.fuzz.targets import all_targets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ramdiscard.fuzz", description=__doc__)
    p.add_argument("--seconds", type=float, default=60.0, help="total time budget (default 60)")
    p.add_argument("--target", action="append", help="target name (repeatable; default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    p.add_argument("--list", action="store_true", help="list the targets and exit")
    p.add_argument("--replay", type=Path, help="re-run one saved input (needs one --target)")
    p.add_argument("--stress", action="store_true", help="run the multi-threaded stress instead")
    p.add_argument("--threads", type=int, default=8, help="stress: worker threads (default 8)")
    args = p.parse_args(argv)

    targets = {t.name: t for t in all_targets()}
    if args.list:
        for t in targets.values():
            reason = t.unavailable()
            print(f"{t.name:18} {t.summary}" + (f"  [unavailable: {reason}]" if reason else ""))
        return 0
    # A hang anywhere is a finding too: dump every thread's stack and exit.
    try:
        faulthandler.dump_traceback_later(args.seconds + 120, exit=True)
        armed = True
    except (OSError, ValueError, AttributeError):  # stderr without a file descriptor
        armed = False
    try:
        return _run(args, targets)
    finally:
        if armed:
            faulthandler.cancel_dump_traceback_later()


def _run(args: argparse.Namespace, targets: dict[str, Target]) -> int:
    if args.stress:
        from ramdiscard.fuzz.stress import run_stress

        result = run_stress(seconds=args.seconds, threads=args.threads, seed=args.seed)
        print(result.summary())
        return 0 if result.ok else 1
    names = args.target or list(targets)
    unknown = [n for n in names if n not in targets]
    if unknown:
        print(f"unknown target(s): {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.replay is not None:
        if len(names) != 1:
            print("--replay needs exactly one --target", file=sys.stderr)
            return 2
        replay(targets[names[0]], args.replay.read_bytes())
        print("no finding")
        return 0
    share = args.seconds / len(names)
    found = 0
    for name in names:
        rep = fuzz(targets[name], seconds=share, seed=args.seed, crash_dir=args.crash_dir)
        if rep.skipped:
            print(f"{name:18} skipped: {rep.skipped}")
            continue
        print(
            f"{name:18} {rep.inputs:9d} inputs in {rep.seconds:6.1f} s "
            f"({rep.rate:8.0f}/s), corpus {rep.corpus:4d}, crashes {rep.crashes}"
        )
        for f in rep.findings:
            print(f"    {f.signature} x{f.count}: {f.message}\n      saved: {f.path}")
        found += rep.crashes
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
