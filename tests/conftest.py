"""Shared fixtures: a stand-in RAM backend for pure model tests (no host memory needed)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@dataclass
class FakeRam:
    """Implements the RamBackend protocol with no memory behind it."""

    size: int
    page_size: int = 4096
    host_address: int = 0x7F0000000000
    discards: list[tuple[int, int]] = field(default_factory=list)


@pytest.fixture
def fake_ram() -> type[FakeRam]:
    return FakeRam


SAMPLE_TRACE = "qemu-virtio-mem-trace-sample.log"


def sample_trace() -> Path:
    """QEMU's sample virtio-mem trace: shared/data's copy when it sits beside the
    repository, else the copy shipped in examples/traces (the same file)."""
    shared = shared_dir()
    if shared is not None and (shared / "data" / SAMPLE_TRACE).is_file():
        return shared / "data" / SAMPLE_TRACE
    return Path(__file__).resolve().parents[1] / "examples" / "traces" / SAMPLE_TRACE


def shared_dir() -> Path | None:
    """The project's shared/ folder (spec, data), which sits beside the repository."""
    env = os.environ.get("RAMDISCARD_SHARED")
    candidates = [Path(env)] if env else []
    root = Path(__file__).resolve().parents[1]
    candidates += [root.parent / "shared", root.parent.parent / "shared"]
    for c in candidates:
        if (c / "data").is_dir():
            return c
    return None
