"""Real-guest scenario files: a stock Linux guest under QEMU drives ramdiscard's device.

Rules:

* A file with a top-level ``[guest]`` table is a real-guest scenario; only ``name``,
  ``description``, ``guest`` and ``steps`` are valid at its top level. :func:`read_guest_scenario`
  returns a frozen :class:`GuestScenario` or raises :class:`ScenarioError` (one line naming
  the source and the key), whatever the file holds; nothing is started while reading.
* ``[guest]``: ``kernel`` and ``initramfs`` are ``"cache"`` (default: the Debian kernel and
  the project's initramfs, built into the cache on first use) or an existing file;
  ``ram`` is the guest's normal RAM (a multiple of 128M from 256M to 2G, default 2G);
  ``region-size`` (default 2G), ``block-size`` (default 2M) and ``requested-size``
  (default 0) are judged by the virtio-mem device's own checks; ``consumers`` is an array
  of distinct names among :data:`GUEST_CONSUMERS` (default ``["vfio"]``);
  ``boot-timeout`` in (0, 3600] seconds (default 240).
* ``[[steps]]``: ``action`` is resize (the default when ``requested-size`` is given; it
  needs ``requested-size``), system-reset, run (needs ``command``: ``touch N`` with N MiB
  in [1, 1048576], ``free`` or ``memtotal``, commands of the project's guest init) or wait.
  Every step takes ``label`` and ``timeout`` (seconds in (0, 3600], default 180); no other
  key is valid for an action.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ramdiscard.machine.scenario.devices import read_requested, refusal
from ramdiscard.machine.scenario.fields import Reader, show
from ramdiscard.machine.scenario.model import ADDRESS_LIMIT, ScenarioError
from ramdiscard.providers.virtio_mem.config import check_block_size, check_region_size, host_page_size
from ramdiscard.providers.virtio_mem.state import PropertyError
from ramdiscard.units import GiB, MiB, format_size

__all__ = [
    "GUEST_CONSUMERS",
    "GuestAction",
    "GuestScenario",
    "GuestSpec",
    "GuestStepSpec",
    "ScenarioError",
    "is_guest_scenario",
    "read_guest_scenario",
]

GUEST_CONSUMERS = ("vfio",)
"""Consumers a real guest can have: ``vfio`` is the io_uring container pinning plugged memory."""
MIN_GUEST_RAM = 256 * MiB
MAX_GUEST_RAM = 2 * GiB
"""A real guest's normal RAM lies below 4 GiB, under the 2 GiB hole q35 leaves for devices."""
GUEST_RAM_STEP = 128 * MiB
TOP_KEYS = ("name", "description", "guest", "steps")
GUEST_KEYS = (
    "kernel", "initramfs", "ram", "region-size", "block-size", "requested-size", "consumers", "boot-timeout",
)  # fmt: skip
STEP_KEYS = ("action", "requested-size", "command", "label", "timeout")
DEVICE_ADDR = 4 * GiB
"""Guest-physical address of a real guest's virtio-mem region (above the 4 GiB line)."""
MAX_TIMEOUT = 3600.0
_COMMAND = re.compile(r"^(?:touch ([1-9][0-9]{0,6})|free|memtotal)$")


class GuestAction(StrEnum):
    RESIZE = "resize"
    SYSTEM_RESET = "system-reset"
    RUN = "run"
    WAIT = "wait"


_ACTION_KEYS = {
    GuestAction.RESIZE: ("requested-size",),
    GuestAction.SYSTEM_RESET: (),
    GuestAction.RUN: ("command",),
    GuestAction.WAIT: (),
}


@dataclass(frozen=True)
class GuestSpec:
    kernel: Path | None = None
    """None: the cached Debian kernel."""
    initramfs: Path | None = None
    ram: int = MAX_GUEST_RAM
    region_size: int = 2 * GiB
    block_size: int = 2 * MiB
    requested_size: int = 0
    consumers: tuple[str, ...] = GUEST_CONSUMERS
    boot_timeout: float = 240.0


@dataclass(frozen=True)
class GuestStepSpec:
    action: GuestAction
    requested_size: int | None = None
    command: str | None = None
    label: str = ""
    timeout: float = 180.0

    def describe(self) -> str:
        """The step's label, or a short description of what it does."""
        if self.label:
            return self.label
        if self.action is GuestAction.RESIZE:
            assert self.requested_size is not None
            return f"-> {format_size(self.requested_size)}"
        if self.action is GuestAction.RUN:
            return f"run {self.command}"
        return self.action.value


@dataclass(frozen=True)
class GuestScenario:
    name: str
    guest: GuestSpec
    steps: tuple[GuestStepSpec, ...] = ()
    description: str = ""
    source: str = "<scenario>"


def is_guest_scenario(data: Mapping[str, Any]) -> bool:
    """Whether a parsed scenario file describes a real guest (it has ``[guest]``)."""
    return "guest" in data


def guest_ram_problem(size: int) -> str | None:
    """Why ``size`` bytes cannot be a real guest's normal RAM, or None when they can."""
    if size % GUEST_RAM_STEP or not MIN_GUEST_RAM <= size <= MAX_GUEST_RAM:
        return "must be a multiple of 128M from 256M to 2G"
    return None


def _timeout(r: Reader, value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= MAX_TIMEOUT:
        raise r.fail(key, f"must be a number of seconds in (0, {MAX_TIMEOUT:g}], got {show(value)}")
    return float(value)


def _image(r: Reader, value: object, key: str) -> Path | None:
    text = r.path(value, key)
    if text == "cache":
        return None
    try:
        exists = Path(text).is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        exists = False
    if not exists:
        raise r.fail(key, f'must be "cache" or an existing file, got {show(text)}')
    return Path(text)


def read_guest(r: Reader, value: object) -> GuestSpec:
    """The ``[guest]`` table; see the module rules."""
    tbl = r.table(value, "guest")
    r.keys(tbl, "guest", GUEST_KEYS)
    kernel = _image(r, tbl.get("kernel", "cache"), "guest.kernel")
    initramfs = _image(r, tbl.get("initramfs", "cache"), "guest.initramfs")
    ram = r.size(tbl.get("ram", "2G"), "guest.ram")
    problem = guest_ram_problem(ram)
    if problem is not None:
        raise r.fail("guest.ram", f"{problem}, got {show(tbl.get('ram'))}")
    raw_bs = tbl.get("block-size", "2M")
    try:
        bs = check_block_size("guest", r.size(raw_bs, "guest.block-size"), host_page_size())
    except PropertyError as err:
        raise r.fail("guest.block-size", refusal(err, raw_bs)) from None
    raw_region = tbl.get("region-size", "2G")
    region = r.size(raw_region, "guest.region-size", allow_zero=False)
    try:
        check_region_size("guest", region, bs)
    except PropertyError as err:
        raise r.fail("guest.region-size", refusal(err, raw_region)) from None
    if DEVICE_ADDR + region > ADDRESS_LIMIT:
        beyond = f"device ends beyond the 48-bit address space, got {show(raw_region)}"
        raise r.fail("guest.region-size", beyond)
    requested = read_requested(r, tbl.get("requested-size", 0), "guest.requested-size", bs, region)
    raw_consumers = tbl.get("consumers", list(GUEST_CONSUMERS))
    if not isinstance(raw_consumers, list):
        raise r.fail("guest.consumers", f"must be an array of names, got {show(raw_consumers)}")
    consumers: list[str] = []
    for i, name in enumerate(raw_consumers):
        if not isinstance(name, str) or name not in GUEST_CONSUMERS:
            known = ", ".join(GUEST_CONSUMERS)
            raise r.fail(f"guest.consumers[{i}]", f"must be one of {known}, got {show(name)}")
        if name in consumers:
            raise r.fail(f"guest.consumers[{i}]", f"duplicate consumer {show(name)}")
        consumers.append(name)
    boot_timeout = _timeout(r, tbl.get("boot-timeout", 240), "guest.boot-timeout")
    return GuestSpec(kernel, initramfs, ram, region, bs, requested, tuple(consumers), boot_timeout)


def read_guest_step(r: Reader, raw: object, key: str, guest: GuestSpec) -> GuestStepSpec:
    """One ``[[steps]]`` entry of a real-guest scenario; see the module rules."""
    tbl = r.table(raw, key)
    r.keys(tbl, key, STEP_KEYS)
    default = GuestAction.RESIZE.value if "requested-size" in tbl else None
    if "action" not in tbl and default is None:
        raise r.fail(f"{key}.action", "missing (or give requested-size for a resize)")
    action: GuestAction = r.choice(tbl.get("action", default), f"{key}.action", GuestAction)
    for k in tbl:
        if k not in ("action", "label", "timeout", *_ACTION_KEYS[action]):
            raise r.fail(f"{key}.{k}", f'not valid for action "{action.value}"')
    label = r.string(tbl.get("label", ""), f"{key}.label")
    timeout = _timeout(r, tbl.get("timeout", 180), f"{key}.timeout")
    requested = command = None
    if action is GuestAction.RESIZE:
        if "requested-size" not in tbl:
            raise r.fail(f"{key}.requested-size", 'missing (action "resize" needs it)')
        requested = read_requested(
            r, tbl["requested-size"], f"{key}.requested-size", guest.block_size, guest.region_size
        )
    elif action is GuestAction.RUN:
        if "command" not in tbl:
            raise r.fail(f"{key}.command", 'missing (action "run" needs it)')
        command = r.string(tbl["command"], f"{key}.command")
        if not _COMMAND.match(command):
            raise r.fail(f"{key}.command", f'must be "touch N" (N MiB, 1 to 1048576), "free" or "memtotal", '
                         f"got {show(command)}")  # fmt: skip
        if command.startswith("touch ") and int(command.split()[1]) > 1 << 20:
            raise r.fail(f"{key}.command", f"touch takes at most 1048576 MiB, got {show(command)}")
    return GuestStepSpec(action, requested, command, label, timeout)


def read_guest_scenario(r: Reader, data: Mapping[str, Any], name: str) -> GuestScenario:
    """The whole real-guest scenario (``data`` has ``guest``); see the module rules."""
    r.keys(data, "", TOP_KEYS)
    description = r.string(data.get("description", ""), "description")
    guest = read_guest(r, data["guest"])
    raw_steps = data.get("steps", [])
    if not isinstance(raw_steps, list):
        raise r.fail("steps", f"must be an array of tables ([[steps]]), got {show(raw_steps)}")
    steps = tuple(read_guest_step(r, raw, f"steps[{i}]", guest) for i, raw in enumerate(raw_steps))
    return GuestScenario(name=name, guest=guest, steps=steps, description=description, source=r.source)
