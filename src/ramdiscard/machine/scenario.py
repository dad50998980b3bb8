"""Scenario files: a TOML description of a VM's sparse RAM, its consumers and a step list.

Rules:

* :func:`load_scenario` / :func:`parse_scenario` return a frozen :class:`Scenario` or raise
  :class:`ScenarioError` whose message is one line naming the source and the offending
  key, e.g. ``scenario.toml: devices[0].block-size: must be a power of two >= 1M, got "3M"``.
  Nothing else is raised for any file content.
* Unknown keys are errors (a typo must not silently fall back to a default).
* Sizes are strings with binary suffixes ("2M", "4G") or integers (bytes); addresses may
  also be hex strings ("0x100000000").
* Cross-checks: device ids unique, device ranges inside the 48-bit address space and
  overlapping neither boot RAM nor each other, requested sizes multiples of the block size
  and at most the device size, steps naming existing devices.

Schema (keys use QEMU's hyphenated spelling)::

    name = "demo"                    # optional
    description = "..."              # optional
    boot-ram = "1G"                  # default 1G; "0" for none
    boot-backing = "anonymous"       # anonymous | memfd

    [[devices]]                      # virtio-mem devices, at least one
    id = "vmem0"                     # required, unique
    size = "16G"                     # required, multiple of block-size
    block-size = "2M"                # power of two >= 1M (default 2M)
    backing = "anonymous"            # anonymous | memfd | file
    thp = true                       # anonymous only: transparent huge pages
    path = "/dev/shm/vmem0.mem"      # file only; default <workdir>/<id>.mem
    overwrite = false                # file only: may an existing non-empty file be used
                                     # (its contents are discarded)? false: refused
    addr = "0x100000000"             # default: after boot RAM / previous device, 1G-aligned, >= 4G
    requested-size = "0"             # at start
    dynamic-memslots = false
    memslot-limit = 0                # 0: unlimited (with dynamic-memslots)
    prealloc = false

    [[consumers]]
    type = "vfio"                    # vfio | kvm | blockdma
    id = "vfio0"                     # optional (default <type><index>)
    backend = "auto"                 # vfio, blockdma: auto | io_uring | mlock | null
    coordinate-discards = true       # vfio, blockdma: false = pin whole regions (ignore the RDM)
    dma-limit = 65535                # vfio: the type1 dma_entry_limit
    dma-limit-check = true           # vfio: QEMU 10.2's worst-case check when a section registers
    mode = "auto"                    # kvm: auto | kvm (real /dev/kvm) | model
    iova-base = "0x100000000"        # blockdma: its private IOVA window ...
    iova-size = "0xffff00000000"     # blockdma: ... and its size
    iova-align = "2M"                # blockdma: alignment of each RAM block's IOVA range

    [workload]
    touch = 0.25                     # fraction of plugged memory the guest writes

    [[steps]]                        # run in order
    requested-size = { vmem0 = "4G" }   # or one size when there is one device
    # action = "resize" | "unplug-all" | "system-reset" | "pause"; device = "vmem0"; seconds = 1.0
    # action = "snapshot" | "restore" | "dump"; path = "..." (optional)
    # action = "migrate"; transport = "file" | "tcp"; path = "..." (file only, optional)
    label = "grow"                   # optional

Step actions ``snapshot`` (save to ``path``, default a file in the machine's snapshot
directory), ``restore`` (load ``path``, default the latest snapshot, into the running
machine, as QEMU's loadvm), ``migrate`` (to a fresh machine built from the same scenario,
through a file or a local TCP connection) and ``dump`` (ELF core of the populated memory
at ``path``) are run by :class:`~ramdiscard.machine.Machine`; every one checks the guest
memory's integrity afterwards.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ramdiscard.errors import InvalidArgument
from ramdiscard.units import GiB, MiB, align_up, is_power_of_2, parse_size

ADDRESS_LIMIT = 1 << 48
DEFAULT_BLOCK_SIZE = 2 * MiB
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


class ScenarioError(InvalidArgument):
    """A scenario is invalid; the message names the source and the key."""


class Backing(StrEnum):
    ANONYMOUS = "anonymous"
    MEMFD = "memfd"
    FILE = "file"


class DmaBackendKind(StrEnum):
    AUTO = "auto"
    IO_URING = "io_uring"
    MLOCK = "mlock"
    NULL = "null"


class ConsumerType(StrEnum):
    VFIO = "vfio"
    KVM = "kvm"
    BLOCKDMA = "blockdma"


class KvmMode(StrEnum):
    AUTO = "auto"
    KVM = "kvm"
    MODEL = "model"


class Action(StrEnum):
    RESIZE = "resize"
    UNPLUG_ALL = "unplug-all"
    SYSTEM_RESET = "system-reset"
    PAUSE = "pause"
    SNAPSHOT = "snapshot"
    RESTORE = "restore"
    MIGRATE = "migrate"
    DUMP = "dump"


class Transport(StrEnum):
    FILE = "file"
    TCP = "tcp"


@dataclass(frozen=True)
class DeviceSpec:
    id: str
    size: int
    block_size: int = DEFAULT_BLOCK_SIZE
    backing: Backing = Backing.ANONYMOUS
    thp: bool = True
    path: str | None = None
    addr: int | None = None
    requested_size: int = 0
    dynamic_memslots: bool = False
    memslot_limit: int = 0
    prealloc: bool = False
    overwrite: bool = False


@dataclass(frozen=True)
class ConsumerSpec:
    type: ConsumerType
    id: str
    backend: DmaBackendKind = DmaBackendKind.AUTO
    coordinate_discards: bool = True
    dma_limit: int = 65535
    dma_limit_check: bool = True
    mode: KvmMode = KvmMode.AUTO
    iova_base: int = 1 << 32
    iova_size: int = (1 << 48) - (1 << 32)
    iova_align: int = 2 * MiB


@dataclass(frozen=True)
class WorkloadSpec:
    touch: float = 0.0


@dataclass(frozen=True)
class StepSpec:
    action: Action
    requested: tuple[tuple[str, int], ...] = ()
    device: str | None = None
    seconds: float = 0.0
    label: str = ""
    path: str | None = None
    transport: Transport = Transport.FILE

    def describe(self) -> str:
        if self.label:
            return self.label
        if self.action is Action.RESIZE:
            from ramdiscard.units import format_size

            return ", ".join(f"{d} -> {format_size(s)}" for d, s in self.requested)
        if self.action is Action.PAUSE:
            return f"pause {self.seconds:g}s"
        if self.action is Action.MIGRATE:
            return f"migrate ({self.transport.value})"
        if self.device:
            return f"{self.action.value} {self.device}"
        return self.action.value


@dataclass(frozen=True)
class Scenario:
    name: str
    devices: tuple[DeviceSpec, ...]
    consumers: tuple[ConsumerSpec, ...] = ()
    steps: tuple[StepSpec, ...] = ()
    boot_ram: int = 1 * GiB
    boot_backing: Backing = Backing.ANONYMOUS
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    description: str = ""
    source: str = "<scenario>"

    def device(self, id: str) -> DeviceSpec:
        for d in self.devices:
            if d.id == id:
                return d
        raise KeyError(id)


def load_scenario(path: str | Path) -> Scenario:
    """Read and validate a scenario file. Raises ScenarioError (also for I/O errors)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_scenario(text, source=p.name)


def parse_scenario(text: str, *, source: str = "<scenario>") -> Scenario:
    """Validate TOML text; see the module rules."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None
    except ValueError as exc:  # tomllib: an integer of more than 4300 digits
        raise ScenarioError(f"{source}: invalid TOML: {exc}") from None
    except RecursionError:  # tomllib parses nested arrays/tables recursively
        raise ScenarioError(f"{source}: invalid TOML: nested too deeply") from None
    return scenario_from_dict(data, source=source)


def scenario_from_dict(data: Mapping[str, Any], *, source: str = "<scenario>") -> Scenario:
    """Validate an already-parsed mapping (same rules as :func:`parse_scenario`)."""
    return _Reader(source).scenario(data)


def _show(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value[:64] + ("..." if len(value) > 64 else ""), ensure_ascii=True)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


class _Reader:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ScenarioError:
        safe = "".join(
            c if c.isascii() and (c.isalnum() or c in "_.[]-") else f"\\u{ord(c):04x}" for c in key
        )
        safe = safe.replace("..", '."".').rstrip(".") if safe.strip(".") else '""'
        return ScenarioError(f"{self.source}: {safe}: {message}")

    def table(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_show(value)}")
        return value

    def keys(self, tbl: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        for k in tbl:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise self.fail(where, f"unknown key (expected one of: {', '.join(allowed)})")

    def size(self, value: object, key: str, *, allow_zero: bool = True) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(key, f'must be a size like "2M" or "4G", got {_show(value)}')
        try:
            n = parse_size(value)
        except ValueError:
            raise self.fail(key, f'must be a size like "2M" or "4G", got {_show(value)}') from None
        if n == 0 and not allow_zero:
            raise self.fail(key, f"must be positive, got {_show(value)}")
        if n >= 1 << 64:
            raise self.fail(key, f"too large, got {_show(value)}")
        return n

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {_show(value)}")
        return value

    def integer(self, value: object, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer in [{lo}, {hi}], got {_show(value)}")
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {_show(value)}")
        return value

    def ident(self, value: object, key: str) -> str:
        s = self.string(value, key)
        if not _ID_RE.match(s):
            raise self.fail(key, f"must be an identifier (letter, then letters/digits/_.-), got {_show(s)}")
        return s

    def choice(self, value: object, key: str, enum: type[StrEnum]) -> Any:
        choices = ", ".join(e.value for e in enum)
        if not isinstance(value, str):
            raise self.fail(key, f"must be one of {choices}, got {_show(value)}")
        try:
            return enum(value)
        except ValueError:
            raise self.fail(key, f"must be one of {choices}, got {_show(value)}") from None

    def array(self, value: object, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables ([[{key}]]), got {_show(value)}")
        return value

    # -- sections -----------------------------------------------------------------------

    def scenario(self, data: Mapping[str, Any]) -> Scenario:
        top = ("name", "description", "boot-ram", "boot-backing", "devices", "consumers", "workload", "steps")
        self.keys(data, "", top)
        name = self.string(data.get("name", Path(self.source).stem), "name")
        description = self.string(data.get("description", ""), "description")
        boot_ram = self.size(data.get("boot-ram", "1G"), "boot-ram")
        if boot_ram % (2 * MiB):
            raise self.fail("boot-ram", f"must be a multiple of 2M, got {_show(data.get('boot-ram'))}")
        boot_backing = self.choice(data.get("boot-backing", "anonymous"), "boot-backing", Backing)
        if boot_backing is Backing.FILE:
            raise self.fail("boot-backing", 'must be anonymous or memfd, got "file"')
        if "devices" not in data:
            raise self.fail("devices", "missing: a scenario needs at least one [[devices]] entry")
        raw_devices = self.array(data["devices"], "devices")
        if not raw_devices:
            raise self.fail("devices", "must hold at least one device")
        devices: list[DeviceSpec] = []
        next_addr = max(4 * GiB, align_up(boot_ram, GiB))
        for i, raw in enumerate(raw_devices):
            d = self.device(raw, f"devices[{i}]", next_addr)
            if any(o.id == d.id for o in devices):
                raise self.fail(f"devices[{i}].id", f"duplicate device id {_show(d.id)}")
            assert d.addr is not None
            if d.addr < boot_ram:
                raise self.fail(f"devices[{i}].addr", f"overlaps boot RAM [0, {boot_ram:#x})")
            for j, o in enumerate(devices):
                assert o.addr is not None
                if d.addr < o.addr + o.size and o.addr < d.addr + d.size:
                    raise self.fail(f"devices[{i}].addr", f"overlaps devices[{j}] ({o.id})")
            devices.append(d)
            next_addr = max(next_addr, align_up(d.addr + d.size, GiB))
        consumers: list[ConsumerSpec] = []
        for i, raw in enumerate(self.array(data.get("consumers", []), "consumers")):
            c = self.consumer(raw, f"consumers[{i}]")
            if any(o.id == c.id for o in consumers):
                raise self.fail(f"consumers[{i}].id", f"duplicate consumer id {_show(c.id)}")
            consumers.append(c)
        workload = self.workload(data.get("workload", {}), "workload")
        steps = tuple(
            self.step(raw, f"steps[{i}]", devices)
            for i, raw in enumerate(self.array(data.get("steps", []), "steps"))
        )
        snapshot_seen = False
        for i, step in enumerate(steps):
            if step.action is Action.SNAPSHOT:
                snapshot_seen = True
            elif step.action is Action.RESTORE and step.path is None and not snapshot_seen:
                raise self.fail(f"steps[{i}].action", '"restore" needs a path or an earlier "snapshot" step')
            elif step.action is Action.MIGRATE:
                for j, d in enumerate(devices):
                    if d.path is not None:
                        raise self.fail(
                            f"steps[{i}].action",
                            f'"migrate" needs a fresh destination, but devices[{j}].path fixes the file '
                            "backing; source and destination would share it",
                        )
        return Scenario(
            name=name,
            description=description,
            devices=tuple(devices),
            consumers=tuple(consumers),
            steps=steps,
            boot_ram=boot_ram,
            boot_backing=boot_backing,
            workload=workload,
            source=self.source,
        )

    def device(self, raw: object, key: str, default_addr: int) -> DeviceSpec:
        tbl = self.table(raw, key)
        allowed = (
            "id", "size", "block-size", "backing", "thp", "path", "addr", "requested-size",
            "dynamic-memslots", "memslot-limit", "prealloc", "overwrite",
        )  # fmt: skip
        self.keys(tbl, key, allowed)
        if "id" not in tbl:
            raise self.fail(f"{key}.id", "missing")
        dev_id = self.ident(tbl["id"], f"{key}.id")
        if "size" not in tbl:
            raise self.fail(f"{key}.size", "missing")
        size = self.size(tbl["size"], f"{key}.size", allow_zero=False)
        bs_raw = tbl.get("block-size", DEFAULT_BLOCK_SIZE)
        bs = self.size(bs_raw, f"{key}.block-size")
        if not is_power_of_2(bs) or bs < MiB:
            raise self.fail(f"{key}.block-size", f"must be a power of two >= 1M, got {_show(bs_raw)}")
        if size % bs:
            raise self.fail(
                f"{key}.size", f"must be a multiple of block-size ({_show(bs_raw)}), got {_show(tbl['size'])}"
            )
        backing = self.choice(tbl.get("backing", "anonymous"), f"{key}.backing", Backing)
        thp = self.boolean(tbl.get("thp", True), f"{key}.thp")
        if "thp" in tbl and backing is not Backing.ANONYMOUS:
            raise self.fail(f"{key}.thp", 'only valid with backing = "anonymous"')
        path = None
        if "path" in tbl:
            if backing is not Backing.FILE:
                raise self.fail(f"{key}.path", 'only valid with backing = "file"')
            path = self.string(tbl["path"], f"{key}.path")
            if not path:
                raise self.fail(f"{key}.path", "must not be empty")
        addr = default_addr
        if "addr" in tbl:
            addr = self.size(tbl["addr"], f"{key}.addr")
        if addr % bs:
            raise self.fail(
                f"{key}.addr", f"must be a multiple of block-size, got {_show(tbl.get('addr', addr))}"
            )
        if addr + size > ADDRESS_LIMIT:
            raise self.fail(f"{key}.addr", f"device ends beyond the 48-bit address space ({addr + size:#x})")
        req_raw = tbl.get("requested-size", 0)
        requested = self.size(req_raw, f"{key}.requested-size")
        self._check_requested(requested, req_raw, bs, size, f"{key}.requested-size")
        dynamic = self.boolean(tbl.get("dynamic-memslots", False), f"{key}.dynamic-memslots")
        limit = self.integer(tbl.get("memslot-limit", 0), f"{key}.memslot-limit", 0, 1 << 20)
        if "memslot-limit" in tbl and not dynamic:
            raise self.fail(f"{key}.memslot-limit", "only valid with dynamic-memslots = true")
        prealloc = self.boolean(tbl.get("prealloc", False), f"{key}.prealloc")
        overwrite = self.boolean(tbl.get("overwrite", False), f"{key}.overwrite")
        if "overwrite" in tbl and backing is not Backing.FILE:
            raise self.fail(f"{key}.overwrite", 'only valid with backing = "file"')
        return DeviceSpec(
            id=dev_id, size=size, block_size=bs, backing=backing, thp=thp, path=path, addr=addr,
            requested_size=requested, dynamic_memslots=dynamic, memslot_limit=limit, prealloc=prealloc,
            overwrite=overwrite,
        )  # fmt: skip

    def _check_requested(self, requested: int, raw: object, bs: int, size: int, key: str) -> None:
        if requested % bs:
            raise self.fail(key, f"must be a multiple of the block size ({bs // MiB}M), got {_show(raw)}")
        if requested > size:
            raise self.fail(key, f"must be at most the device size, got {_show(raw)}")

    def consumer(self, raw: object, key: str) -> ConsumerSpec:
        tbl = self.table(raw, key)
        if "type" not in tbl:
            raise self.fail(f"{key}.type", "missing (vfio, kvm or blockdma)")
        ctype = self.choice(tbl["type"], f"{key}.type", ConsumerType)
        if ctype is ConsumerType.VFIO:
            allowed: tuple[str, ...] = (
                "type", "id", "backend", "coordinate-discards", "dma-limit", "dma-limit-check",
            )  # fmt: skip
        elif ctype is ConsumerType.BLOCKDMA:
            allowed = ("type", "id", "backend", "coordinate-discards", "iova-base", "iova-size", "iova-align")
        else:
            allowed = ("type", "id", "mode")
        self.keys(tbl, key, allowed)
        cid = self.ident(tbl.get("id", ctype.value + key.split("[")[1].rstrip("]")), f"{key}.id")
        iova_base = self.size(tbl.get("iova-base", 1 << 32), f"{key}.iova-base")
        iova_size = self.size(
            tbl.get("iova-size", (1 << 48) - (1 << 32)), f"{key}.iova-size", allow_zero=False
        )
        align_raw = tbl.get("iova-align", "2M")
        iova_align = self.size(align_raw, f"{key}.iova-align")
        if not is_power_of_2(iova_align) or iova_align < 4096:
            raise self.fail(f"{key}.iova-align", f"must be a power of two >= 4K, got {_show(align_raw)}")
        if iova_base % iova_align:
            raise self.fail(
                f"{key}.iova-base", f"must be a multiple of iova-align, got {_show(tbl['iova-base'])}"
            )
        if iova_base + iova_size > 1 << 64:
            raise self.fail(f"{key}.iova-size", "the IOVA window ends beyond 64 bits")
        return ConsumerSpec(
            type=ctype,
            id=cid,
            backend=self.choice(tbl.get("backend", "auto"), f"{key}.backend", DmaBackendKind),
            coordinate_discards=self.boolean(
                tbl.get("coordinate-discards", True), f"{key}.coordinate-discards"
            ),
            dma_limit=self.integer(tbl.get("dma-limit", 65535), f"{key}.dma-limit", 1, 1 << 32),
            dma_limit_check=self.boolean(tbl.get("dma-limit-check", True), f"{key}.dma-limit-check"),
            mode=self.choice(tbl.get("mode", "auto"), f"{key}.mode", KvmMode),
            iova_base=iova_base,
            iova_size=iova_size,
            iova_align=iova_align,
        )

    def workload(self, raw: object, key: str) -> WorkloadSpec:
        tbl = self.table(raw, key)
        self.keys(tbl, key, ("touch",))
        touch = tbl.get("touch", 0.0)
        if (
            isinstance(touch, bool)
            or not isinstance(touch, (int, float))
            or not 0 <= touch <= 1
            or (isinstance(touch, float) and math.isnan(touch))
        ):
            raise self.fail(f"{key}.touch", f"must be a number in [0, 1], got {_show(touch)}")
        return WorkloadSpec(touch=float(touch))

    def step(self, raw: object, key: str, devices: list[DeviceSpec]) -> StepSpec:
        tbl = self.table(raw, key)
        self.keys(tbl, key, ("action", "requested-size", "device", "seconds", "label", "path", "transport"))
        default = Action.RESIZE if "requested-size" in tbl else None
        if "action" in tbl:
            action = self.choice(tbl["action"], f"{key}.action", Action)
        elif default is None:
            raise self.fail(key, "needs requested-size or action")
        else:
            action = default
        label = self.string(tbl.get("label", ""), f"{key}.label")
        by_id = {d.id: d for d in devices}
        with_path = (Action.SNAPSHOT, Action.RESTORE, Action.MIGRATE, Action.DUMP)
        if "path" in tbl and action not in with_path:
            raise self.fail(f"{key}.path", f"not valid for action {_show(action.value)}")
        if "transport" in tbl and action is not Action.MIGRATE:
            raise self.fail(f"{key}.transport", f"not valid for action {_show(action.value)}")
        if action in with_path:
            for extra in ("device", "seconds", "requested-size"):
                if extra in tbl:
                    raise self.fail(f"{key}.{extra}", f"not valid for action {_show(action.value)}")
            transport = self.choice(tbl.get("transport", "file"), f"{key}.transport", Transport)
            path = None
            if "path" in tbl:
                path = self.string(tbl["path"], f"{key}.path")
                if not path:
                    raise self.fail(f"{key}.path", "must not be empty")
                if transport is Transport.TCP:
                    raise self.fail(f"{key}.path", 'not valid with transport = "tcp"')
            return StepSpec(action=action, label=label, path=path, transport=transport)
        if action is Action.RESIZE:
            if "requested-size" not in tbl:
                raise self.fail(f"{key}.requested-size", 'missing for action "resize"')
            for extra in ("device", "seconds"):
                if extra in tbl:
                    raise self.fail(f"{key}.{extra}", 'not valid for action "resize"')
            req = tbl["requested-size"]
            pairs: list[tuple[str, int]] = []
            if isinstance(req, dict):
                if not req:
                    raise self.fail(f"{key}.requested-size", "must name at least one device")
                items = list(req.items())
            else:
                if len(devices) != 1:
                    raise self.fail(
                        f"{key}.requested-size",
                        "must be a table { device-id = size } when there are several devices",
                    )
                items = [(devices[0].id, req)]
            for dev_id, value in items:
                k = f"{key}.requested-size" + (f".{dev_id}" if isinstance(req, dict) else "")
                if dev_id not in by_id:
                    raise self.fail(k, f"unknown device {_show(dev_id)}")
                size = self.size(value, k)
                d = by_id[dev_id]
                self._check_requested(size, value, d.block_size, d.size, k)
                pairs.append((dev_id, size))
            return StepSpec(action=action, requested=tuple(pairs), label=label)
        if "requested-size" in tbl:
            raise self.fail(f"{key}.requested-size", f"not valid for action {_show(action.value)}")
        if action is Action.PAUSE:
            if "device" in tbl:
                raise self.fail(f"{key}.device", 'not valid for action "pause"')
            secs = tbl.get("seconds", 1.0)
            if isinstance(secs, bool) or not isinstance(secs, (int, float)) or not 0 <= secs <= 3600:
                raise self.fail(
                    f"{key}.seconds", f"must be a number of seconds in [0, 3600], got {_show(secs)}"
                )
            return StepSpec(action=action, seconds=float(secs), label=label)
        if "seconds" in tbl:
            raise self.fail(f"{key}.seconds", f"not valid for action {_show(action.value)}")
        device = None
        if "device" in tbl:
            device = self.string(tbl["device"], f"{key}.device")
            if device not in by_id:
                raise self.fail(f"{key}.device", f"unknown device {_show(device)}")
        return StepSpec(action=action, device=device, label=label)
