"""The fuzzing loop: seeded, coverage-less, behaviour-guided mutation over byte inputs.

Rules:

* A :class:`Target` turns bytes into actions on real objects through a :class:`Harness`.
  The harness itself catches every *documented* outcome (a response, a documented
  protocol/state/parse error) and checks the invariants after each input; anything that
  escapes :meth:`Harness.run` (an undocumented exception or an ``AssertionError`` from an
  invariant) is a *finding*.
* After a finding the harness is closed and rebuilt, so one bug does not cascade into
  false findings. Findings are de-duplicated by (exception type, innermost project frame);
  the first input of each is saved as ``<crash_dir>/<target>/crash-<sha1>.bin`` with the
  traceback beside it as ``.txt``. :func:`replay` re-runs a saved input.
* Guidance without coverage: :meth:`Harness.run` returns a hashable *behaviour signature*
  (e.g. the sequence of response types). An input whose signature was never seen joins
  the corpus (bounded; seeds are never evicted), so inputs that reached new outcomes get
  mutated further.
* Every ``deep_every`` inputs, :meth:`Harness.deep_check` runs the expensive invariants
  (host residency through ``mincore``).
* Everything random comes from ``random.Random(seed)``: the same seed and the same number
  of inputs give the same inputs (wall-clock limits only decide where a run stops).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import random
import time
import traceback
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ramdiscard.fileio import create_output
from ramdiscard.fuzz.mutate import mutate_bytes

Mutator = Callable[[bytes, random.Random, Sequence[bytes], int], bytes]


class Harness(Protocol):
    """Runs inputs against live objects; see the module rules."""

    def run(self, data: bytes) -> Hashable:
        """Execute one input; return its behaviour signature. Raise only on a finding."""
        ...

    def deep_check(self) -> None:
        """Expensive invariants (AssertionError on a violation)."""
        ...

    def close(self) -> None:
        """Release everything (memory, fds, listeners)."""
        ...


@dataclass(frozen=True)
class Target:
    """A named fuzz target. ``unavailable`` returns a reason when the module under test is
    missing on this branch (the target is then skipped, not failed)."""

    name: str
    summary: str
    seeds: Callable[[], list[bytes]]
    harness: Callable[[], Harness]
    mutate: Mutator = mutate_bytes
    max_size: int = 2048
    deep_every: int = 64
    unavailable: Callable[[], str | None] = lambda: None


@dataclass
class Finding:
    signature: str
    message: str
    path: Path | None
    count: int = 1


@dataclass
class Report:
    """What one target run did."""

    target: str
    inputs: int = 0
    seconds: float = 0.0
    corpus: int = 0
    findings: list[Finding] = field(default_factory=list)
    skipped: str | None = None

    @property
    def crashes(self) -> int:
        """Distinct findings."""
        return len(self.findings)

    @property
    def rate(self) -> float:
        return self.inputs / self.seconds if self.seconds > 0 else 0.0


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = "?"
    for fr in reversed(frames):
        if "ramdiscard" in fr.filename:
            where = f"{Path(fr.filename).name}:{fr.lineno}"
            break
    return f"{type(exc).__name__}@{where}"


def _save(crash_dir: Path | None, target: str, data: bytes, exc: BaseException) -> Path | None:
    if crash_dir is None:
        return None
    out = crash_dir / target
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"crash-{hashlib.sha1(data).hexdigest()}.bin"
    with create_output(path, "crash file", durable=False) as f:
        f.write(data)
    with create_output(path.with_suffix(".txt"), "crash report", durable=False) as f:
        f.write("".join(traceback.format_exception(exc)).encode())
    return path


def fuzz(
    target: Target,
    *,
    seconds: float,
    seed: int = 0,
    crash_dir: Path | None = None,
    max_inputs: int | None = None,
    corpus_limit: int = 512,
) -> Report:
    """Run ``target`` for ``seconds`` of wall time (or ``max_inputs`` inputs)."""
    report = Report(target.name)
    reason = target.unavailable()
    if reason is not None:
        report.skipped = reason
        return report
    rng = random.Random(seed)
    seeds = [s[: target.max_size] for s in target.seeds()] or [b""]
    corpus: list[bytes] = list(seeds)
    seen: set[Hashable] = set()
    findings: dict[str, Finding] = {}
    # Expected failures (injected faults, refusals) are logged as warnings by design;
    # thousands of them per second would only slow the run down.
    quiet = logging.getLogger("ramdiscard")
    old_level = quiet.level
    quiet.setLevel(logging.CRITICAL + 1)
    harness = target.harness()
    start = time.monotonic()
    deadline = start + seconds
    try:
        while True:
            if max_inputs is not None and report.inputs >= max_inputs:
                break
            if report.inputs % 16 == 0 and time.monotonic() >= deadline:
                break
            # The seeds run once unmodified first, then mutations of the corpus.
            if report.inputs < len(seeds):
                data = seeds[report.inputs]
            else:
                data = target.mutate(rng.choice(corpus), rng, corpus, target.max_size)
            report.inputs += 1
            try:
                sig = harness.run(data)
                if report.inputs % target.deep_every == 0:
                    harness.deep_check()
            except Exception as exc:
                key = _signature(exc)
                if key in findings:
                    findings[key].count += 1
                else:
                    findings[key] = Finding(key, f"{type(exc).__name__}: {exc}"[:500], None)
                    findings[key].path = _save(crash_dir, target.name, data, exc)
                with contextlib.suppress(Exception):
                    harness.close()
                harness = target.harness()
                continue
            if sig not in seen:
                seen.add(sig)
                if len(corpus) >= corpus_limit:
                    corpus[rng.randrange(len(seeds), len(corpus))] = data
                else:
                    corpus.append(data)
        try:
            harness.deep_check()
        except Exception as exc:
            key = _signature(exc)
            findings.setdefault(key, Finding(key, f"{type(exc).__name__}: {exc}"[:500], None))
    finally:
        harness.close()
        quiet.setLevel(old_level)
    report.seconds = time.monotonic() - start
    report.corpus = len(corpus)
    report.findings = list(findings.values())
    return report


def replay(target: Target, data: bytes) -> None:
    """Run one saved input against a fresh harness; raises what the finding raised."""
    harness = target.harness()
    try:
        harness.run(data)
        harness.deep_check()
    finally:
        harness.close()
