"""Fuzz targets, one module per input format; :data:`TARGETS` lists them in run order."""

from __future__ import annotations

from ramdiscard.fuzz.engine import Target


def all_targets() -> list[Target]:
    """Every target known to this build (unavailable ones report why when run)."""
    from ramdiscard.fuzz.targets import migration, qmp, scenario, state, text, virtio

    return [
        virtio.REQUEST_TARGET,
        virtio.SEQUENCE_TARGET,
        state.STATE_TARGET,
        migration.MIGRATION_TARGET,
        text.TRACE_TARGET,
        qmp.QMP_TARGET,
        scenario.SCENARIO_TARGET,
        *state.extra_targets(),
        *text.extra_targets(),
    ]
