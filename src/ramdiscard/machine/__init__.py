"""Scenario machines: TOML scenarios, the Machine that runs them, and its consumers.

API for tools (CLI, QMP server): :func:`load_scenario` / :func:`parse_scenario` ->
:class:`Scenario`; :meth:`Machine.from_scenario`; per device id ``get_requested_size`` /
``set_requested_size`` / ``sizes``; ``run_step`` / ``run_guest`` (synchronous) or
``start`` / ``wait_converged`` / ``stop`` (background guest thread); ``snapshot`` /
``restore`` / ``migrate`` / ``dump``; ``status()``; ``lock``; ``close()``.

Modules, one concern each: :mod:`.scenario` (the file: one module per table),
:mod:`.machine` (the Machine: host control, the guest, its thread, close), :mod:`.build`
(scenario -> machine), :mod:`.consumers` (vfio/kvm/blockdma consumers),
:mod:`.steps` (one step: action handlers, the guest's reaction), :mod:`.checkpoint`
(snapshot, restore, migrate, dump, integrity), :mod:`.figures` (status, samples),
:mod:`.files` (files and directories the machine creates), :mod:`.guest_memory`
(guest-physical access for the workload).
"""

from ramdiscard.machine.consumers import Consumer, KvmConsumer, VfioConsumer
from ramdiscard.machine.machine import Machine
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
from ramdiscard.machine.steps import StepResult

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
