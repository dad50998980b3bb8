"""Scenario machines: TOML scenarios, the Machine that runs them, and its consumers.

API for tools (CLI, QMP server): :func:`load_scenario` / :func:`parse_scenario` ->
:class:`Scenario`; :meth:`Machine.from_scenario`; per device id ``get_requested_size`` /
``set_requested_size`` / ``sizes``; ``run_step`` / ``run_guest`` (synchronous) or
``start`` / ``wait_converged`` / ``stop`` (background guest thread); ``snapshot`` /
``restore`` / ``migrate`` / ``dump``; ``status()``; ``lock``; ``close()``.
"""

from ramdiscard.machine.consumers import Consumer, KvmConsumer, VfioConsumer
from ramdiscard.machine.machine import Machine, StepResult
from ramdiscard.machine.scenario import (
    Action,
    ConsumerSpec,
    DeviceSpec,
    Scenario,
    ScenarioError,
    StepSpec,
    Transport,
    WorkloadSpec,
    load_scenario,
    parse_scenario,
    scenario_from_dict,
)

__all__ = [
    "Action",
    "Consumer",
    "ConsumerSpec",
    "DeviceSpec",
    "KvmConsumer",
    "Machine",
    "Scenario",
    "ScenarioError",
    "StepResult",
    "StepSpec",
    "Transport",
    "VfioConsumer",
    "WorkloadSpec",
    "load_scenario",
    "parse_scenario",
    "scenario_from_dict",
]
