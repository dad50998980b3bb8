"""Text-format fuzzing: QEMU trace logs (target ``trace``), and the scenario files of
:mod:`ramdiscard.machine` once present (:func:`extra_targets`).

Trace: the input is decoded as UTF-8 (invalid bytes replaced, as
:func:`~ramdiscard.providers.virtio_mem.parse_trace_file` does) and parsed in strict and lenient
mode. Documented outcomes: a :class:`TraceLog`, or :class:`TraceParseError` in strict mode
only. A parsed log is then replayed against a fresh device of the sample's geometry
(4 GiB at 4 GiB, over a RAM stand-in): :func:`replay_trace` must return a report, and
the device must stay consistent.
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

from ramdiscard.fuzz.engine import Target
from ramdiscard.fuzz.invariants import check_device
from ramdiscard.fuzz.mutate import mutate_text
from ramdiscard.fuzz.targets.virtio import FakeRam
from ramdiscard.memory import MemoryRegion
from ramdiscard.providers.virtio_mem import VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.replay.events import TraceParseError, parse_trace
from ramdiscard.replay.trace import replay_trace
from ramdiscard.units import GiB, MiB

SAMPLE = "qemu-virtio-mem-trace-sample.log"


def shared_data() -> Path | None:
    """The folder holding QEMU's sample trace: ``shared/data`` beside the repository (or
    $RAMDISCARD_SHARED), else the copy shipped in the repository's ``examples/traces``."""
    import os

    env = os.environ.get("RAMDISCARD_SHARED")
    here = Path(__file__).resolve()
    candidates = [Path(env) / "data"] if env else []
    candidates += [p / "shared" / "data" for p in here.parents]
    candidates += [p / "examples" / "traces" for p in here.parents]
    for c in candidates:
        if (c / SAMPLE).is_file():
            return c
    return None


class TraceHarness:
    def __init__(self) -> None:
        self.policy = DiscardPolicy()

    def close(self) -> None:
        pass

    def deep_check(self) -> None:
        pass

    def run(self, data: bytes) -> Hashable:
        lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
        lenient = parse_trace(lines, strict=False)
        try:
            strict = parse_trace(lines)
        except TraceParseError:
            strict = None
        if strict is not None:
            assert strict.events == lenient.events, "strict and lenient parses disagree on a valid log"
        mr = MemoryRegion.new_ram("fuzz-trace", FakeRam(4 * GiB))
        dev = VirtioMem(mr, addr=4 * GiB, block_size=2 * MiB, requested_size=0, policy=self.policy)
        try:
            report = replay_trace(lenient, dev)
            check_device(dev)
        finally:
            dev.unrealize()
        kinds = tuple(sorted({type(e).__name__ for e in lenient.events}))
        return kinds, strict is None, report.ok, len(report.mismatches) > 0


def _seeds() -> list[bytes]:
    data = shared_data()
    seeds = [
        b"1@1.0:virtio_mem_resized_usable_region old_size=0x0 new_size=0x20000000\n"
        b"1@1.1:virtio_mem_plug_request addr=0x100000000 nb_blocks=4\n"
        b"1@1.2:virtio_mem_send_response type=0\n"
        b"1@1.3:virtio_mem_state_request addr=0x100000000 nb_blocks=8\n"
        b"1@1.4:virtio_mem_state_response state=2\n"
        b"1@1.5:virtio_mem_send_response type=0\n"
    ]
    if data is not None:
        text = (data / SAMPLE).read_bytes()
        seeds.append(text)
        lines = text.split(b"\n")
        seeds += [b"\n".join(lines[i : i + 12]) for i in range(0, len(lines), 12)]
    return seeds


TRACE_TARGET = Target(
    "trace",
    "QEMU virtio-mem trace logs: parse (strict and lenient) and replay",
    _seeds,
    TraceHarness,
    mutate=mutate_text,
    max_size=8192,
    deep_every=1 << 30,
)


def extra_targets() -> list[Target]:
    """Scenario-file target when ramdiscard.machine is present."""
    return []
