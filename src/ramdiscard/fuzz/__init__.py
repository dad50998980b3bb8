"""Fuzzing and stress testing of every input that crosses a trust boundary.

* :mod:`~ramdiscard.fuzz.engine`: the seeded, coverage-less, behaviour-guided mutation loop.
* :mod:`~ramdiscard.fuzz.mutate`: byte and text mutators.
* :mod:`~ramdiscard.fuzz.model`: the reference model of virtio-mem responses (the oracle).
* :mod:`~ramdiscard.fuzz.invariants`: checks shared by fuzzing, fault sweeps and stress.
* :mod:`~ramdiscard.fuzz.targets`: one module per input format.
* :mod:`~ramdiscard.fuzz.stress`: multi-threaded stress with continuous invariants.

Run ``python -m ramdiscard.fuzz --seconds N [--target NAME]`` (``--list`` shows targets,
``--stress`` runs the concurrency stress instead, ``--replay FILE`` re-runs a saved crash).
See docs/reliability.md.
"""

from ramdiscard.fuzz.engine import Finding, Harness, Report, Target, fuzz, replay

__all__ = ["Finding", "Harness", "Report", "Target", "fuzz", "replay"]
