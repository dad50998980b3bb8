"""The ``[[steps]]`` table: what the host does to the machine, in order.

Rules:

* ``action`` names the step (:class:`Action`); without it, a step with
  ``requested-size`` is a ``resize``. ``label`` is valid for every action.
* Each action takes only its own keys (:data:`KEYS`, among :data:`STEP_KEYS`); another known step key is "not
  valid for action ..." and an unknown one is an unknown key.
  resize: ``requested-size`` (required; one size when there is one device, else a table
  ``{ device-id = size }``, each judged as the device's ``requested-size``);
  unplug-all, system-reset: ``device`` (optional, an existing device id);
  pause: ``seconds`` in [0, 3600] (default 1);
  snapshot, restore, dump: ``path`` (optional, not empty);
  migrate: ``transport`` (file | tcp) and ``path`` (file only);
  live-migrate: ``downtime-limit`` (ms, an integer in [0, 2000000], default 300),
  ``max-bandwidth`` (a size per second, default 0: unlimited) and ``requested-size``
  (optional, read as resize's: applied once the migration is active).
* Across steps: a ``restore`` without ``path`` needs an earlier ``snapshot``; a
  ``migrate`` or ``live-migrate`` needs no device with a fixed file ``path`` (source and destination would
  share the file).

A new step kind is an :class:`Action` member, its keys in :data:`KEYS` (new ones also in
:data:`STEP_KEYS`) and its reader in :data:`READERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ramdiscard.machine.scenario.devices import read_requested
from ramdiscard.machine.scenario.fields import Reader, show
from ramdiscard.machine.scenario.model import Action, DeviceSpec, StepSpec, Transport

STEP_KEYS = (
    "action", "requested-size", "device", "seconds", "label", "path", "transport", "downtime-limit",
    "max-bandwidth",
)  # fmt: skip
"""Every key a step may have, in the order they are checked."""

KEYS: dict[Action, tuple[str, ...]] = {
    Action.RESIZE: ("requested-size",),
    Action.UNPLUG_ALL: ("device",),
    Action.SYSTEM_RESET: ("device",),
    Action.PAUSE: ("seconds",),
    Action.SNAPSHOT: ("path",),
    Action.RESTORE: ("path",),
    Action.DUMP: ("path",),
    Action.MIGRATE: ("path", "transport"),
    Action.LIVE_MIGRATE: ("requested-size", "downtime-limit", "max-bandwidth"),
}
"""The keys each action takes besides ``action`` and ``label``."""

StepReader = Callable[[Reader, Mapping[str, Any], str, Action, str, Sequence[DeviceSpec]], StepSpec]
"""``fn(reader, table, key, action, label, devices)``: the step, its keys already known
to be valid for its action."""


def read_steps(r: Reader, value: object, devices: Sequence[DeviceSpec]) -> tuple[StepSpec, ...]:
    """The ``steps`` array (may be empty); see the module rules."""
    steps = tuple(read_step(r, raw, f"steps[{i}]", devices) for i, raw in enumerate(r.array(value, "steps")))
    snapshot_seen = False
    for i, step in enumerate(steps):
        if step.action is Action.SNAPSHOT:
            snapshot_seen = True
        elif step.action is Action.RESTORE and step.path is None and not snapshot_seen:
            raise r.fail(f"steps[{i}].action", '"restore" needs a path or an earlier "snapshot" step')
        elif step.action in (Action.MIGRATE, Action.LIVE_MIGRATE):
            for j, d in enumerate(devices):
                if d.path is not None:
                    raise r.fail(
                        f"steps[{i}].action",
                        f"{show(step.action.value)} needs a fresh destination, but devices[{j}].path "
                        "fixes the file backing; source and destination would share it",
                    )
    return steps


def read_step(r: Reader, raw: object, key: str, devices: Sequence[DeviceSpec]) -> StepSpec:
    """One ``[[steps]]`` entry at ``key``."""
    tbl = r.table(raw, key)
    r.keys(tbl, key, STEP_KEYS)
    if "action" in tbl:
        action: Action = r.choice(tbl["action"], f"{key}.action", Action)
    elif "requested-size" in tbl:
        action = Action.RESIZE
    else:
        raise r.fail(key, "needs requested-size or action")
    label = r.string(tbl.get("label", ""), f"{key}.label")
    for k in STEP_KEYS:
        if k in tbl and k not in (*KEYS[action], "action", "label"):
            raise r.fail(f"{key}.{k}", f"not valid for action {show(action.value)}")
    return READERS[action](r, tbl, key, action, label, devices)


def _resize(
    r: Reader, tbl: Mapping[str, Any], key: str, action: Action, label: str, devices: Sequence[DeviceSpec]
) -> StepSpec:
    if "requested-size" not in tbl:
        raise r.fail(f"{key}.requested-size", 'missing for action "resize"')
    req = tbl["requested-size"]
    if isinstance(req, dict):
        if not req:
            raise r.fail(f"{key}.requested-size", "must name at least one device")
        items = list(req.items())
    elif len(devices) != 1:
        raise r.fail(
            f"{key}.requested-size", "must be a table { device-id = size } when there are several devices"
        )
    else:
        items = [(devices[0].id, req)]
    by_id = {d.id: d for d in devices}
    pairs: list[tuple[str, int]] = []
    for dev_id, value in items:
        k = f"{key}.requested-size" + (f".{dev_id}" if isinstance(req, dict) else "")
        if dev_id not in by_id:
            raise r.fail(k, f"unknown device {show(dev_id)}")
        d = by_id[dev_id]
        pairs.append((dev_id, read_requested(r, value, k, d.block_size, d.size)))
    return StepSpec(action=action, requested=tuple(pairs), label=label)


def _device(
    r: Reader, tbl: Mapping[str, Any], key: str, action: Action, label: str, devices: Sequence[DeviceSpec]
) -> StepSpec:
    device = None
    if "device" in tbl:
        device = r.string(tbl["device"], f"{key}.device")
        if device not in {d.id for d in devices}:
            raise r.fail(f"{key}.device", f"unknown device {show(device)}")
    return StepSpec(action=action, device=device, label=label)


def _pause(
    r: Reader, tbl: Mapping[str, Any], key: str, action: Action, label: str, devices: Sequence[DeviceSpec]
) -> StepSpec:
    secs = tbl.get("seconds", 1.0)
    if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not 0 <= secs <= 3600:
        raise r.fail(f"{key}.seconds", f"must be a number of seconds in [0, 3600], got {show(secs)}")
    return StepSpec(action=action, seconds=float(secs), label=label)


def _with_path(
    r: Reader, tbl: Mapping[str, Any], key: str, action: Action, label: str, devices: Sequence[DeviceSpec]
) -> StepSpec:
    transport = r.choice(tbl.get("transport", "file"), f"{key}.transport", Transport)
    path = None
    if "path" in tbl:
        path = r.path(tbl["path"], f"{key}.path")
        if transport is Transport.TCP:
            raise r.fail(f"{key}.path", 'not valid with transport = "tcp"')
    return StepSpec(action=action, label=label, path=path, transport=transport)


def _live_migrate(
    r: Reader, tbl: Mapping[str, Any], key: str, action: Action, label: str, devices: Sequence[DeviceSpec]
) -> StepSpec:
    requested: tuple[tuple[str, int], ...] = ()
    if "requested-size" in tbl:
        requested = _resize(r, tbl, key, action, label, devices).requested
    limit = tbl.get("downtime-limit", 300)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 2_000_000:
        raise r.fail(
            f"{key}.downtime-limit", f"must be an integer of milliseconds in [0, 2000000], got {show(limit)}"
        )
    bandwidth = r.size(tbl.get("max-bandwidth", 0), f"{key}.max-bandwidth")
    return StepSpec(
        action=action, requested=requested, label=label, downtime_limit=limit, max_bandwidth=bandwidth
    )


READERS: dict[Action, StepReader] = {
    Action.RESIZE: _resize,
    Action.UNPLUG_ALL: _device,
    Action.SYSTEM_RESET: _device,
    Action.PAUSE: _pause,
    Action.SNAPSHOT: _with_path,
    Action.RESTORE: _with_path,
    Action.DUMP: _with_path,
    Action.MIGRATE: _with_path,
    Action.LIVE_MIGRATE: _live_migrate,
}
"""How each action's step is read (:data:`StepReader`)."""
