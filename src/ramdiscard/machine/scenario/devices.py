"""The ``[[devices]]`` table: the scenario's virtio-mem devices.

Rules:

* What is about the file is checked here: keys and their types, keys valid only with one
  backing (``thp``: anonymous; ``path``, ``overwrite``: file), ``memslot-limit`` only with
  ``dynamic-memslots``, unique identifiers, and the machine's layout: the default ``addr``
  (after boot RAM and the previous device, 1G aligned, at least 4G), the 48-bit
  guest-physical address space, no overlap with boot RAM or another device.
* The device's properties (``block-size`` and its default, ``size``, ``addr``,
  ``requested-size``) are judged by the device's own checks
  (:func:`~ramdiscard.providers.virtio_mem.config.check_block_size`,
  :func:`~ramdiscard.providers.virtio_mem.config.check_region_size`,
  :func:`~ramdiscard.providers.virtio_mem.config.check_addr`,
  :func:`~ramdiscard.providers.virtio_mem.state.check_requested`) for a memory backend of
  host base pages, so a value gets the same answer and the same default here as when the
  device is realized. A refusal is worded for the file (:func:`refusal`): the scenario key
  and the value as written.
"""

from __future__ import annotations

from ramdiscard.machine.scenario.fields import Reader, short_size, show
from ramdiscard.machine.scenario.model import ADDRESS_LIMIT, Backing, DeviceSpec
from ramdiscard.providers.virtio_mem.config import (
    MIN_BLOCK_SIZE,
    check_addr,
    check_block_size,
    check_region_size,
    host_page_size,
)
from ramdiscard.providers.virtio_mem.state import PropertyError, Rule, check_requested
from ramdiscard.units import GiB, align_up

KEYS = (
    "id", "size", "block-size", "backing", "thp", "path", "addr", "requested-size",
    "dynamic-memslots", "memslot-limit", "prealloc", "overwrite",
)  # fmt: skip


def refusal(err: PropertyError, raw: object) -> str:
    """The device's refusal ``err`` of the value written as ``raw``, for the file."""
    if err.rule in (Rule.BELOW_MINIMUM, Rule.NOT_POWER_OF_TWO):
        text = f"must be a power of two >= {short_size(MIN_BLOCK_SIZE)}"
    elif err.rule is Rule.BELOW_PAGE_SIZE:
        text = f"must be at least the page size of its memory ({short_size(err.limit)})"
    elif err.rule is Rule.NOT_BLOCK_MULTIPLE:
        text = f"must be a multiple of block-size ({short_size(err.limit)})"
    elif err.rule is Rule.BEYOND_SIZE:
        text = "must be at most the device size"
    elif err.rule is Rule.BEYOND_ADDRESS_SPACE:
        text = "device ends beyond the 64-bit address space"
    else:
        text = "must be a non-negative size"
    return f"{text}, got {show(raw)}"


def read_devices(r: Reader, value: object, boot_ram: int) -> tuple[DeviceSpec, ...]:
    """The ``devices`` array (at least one device); see the module rules."""
    raw_devices = r.array(value, "devices")
    if not raw_devices:
        raise r.fail("devices", "must hold at least one device")
    devices: list[DeviceSpec] = []
    next_addr = max(4 * GiB, align_up(boot_ram, GiB))
    for i, raw in enumerate(raw_devices):
        d = read_device(r, raw, f"devices[{i}]", next_addr)
        if any(o.id == d.id for o in devices):
            raise r.fail(f"devices[{i}].id", f"duplicate device id {show(d.id)}")
        assert d.addr is not None
        if d.addr < boot_ram:
            raise r.fail(f"devices[{i}].addr", f"overlaps boot RAM [0, {boot_ram:#x})")
        for j, o in enumerate(devices):
            assert o.addr is not None
            if d.addr < o.addr + o.size and o.addr < d.addr + d.size:
                raise r.fail(f"devices[{i}].addr", f"overlaps devices[{j}] ({o.id})")
        devices.append(d)
        next_addr = max(next_addr, align_up(d.addr + d.size, GiB))
    return tuple(devices)


def read_device(r: Reader, raw: object, key: str, default_addr: int) -> DeviceSpec:
    """One ``[[devices]]`` entry at ``key``; ``default_addr`` if it names no ``addr``."""
    tbl = r.table(raw, key)
    r.keys(tbl, key, KEYS)
    if "id" not in tbl:
        raise r.fail(f"{key}.id", "missing")
    dev_id = r.ident(tbl["id"], f"{key}.id")
    if "size" not in tbl:
        raise r.fail(f"{key}.size", "missing")
    size = r.size(tbl["size"], f"{key}.size", allow_zero=False)
    explicit_bs = r.size(tbl["block-size"], f"{key}.block-size") if "block-size" in tbl else None
    try:
        bs = check_block_size(dev_id, explicit_bs, host_page_size())
    except PropertyError as err:
        raise r.fail(f"{key}.block-size", refusal(err, tbl["block-size"])) from None
    try:
        check_region_size(dev_id, size, bs)
    except PropertyError as err:
        raise r.fail(f"{key}.size", refusal(err, tbl["size"])) from None
    backing = r.choice(tbl.get("backing", "anonymous"), f"{key}.backing", Backing)
    thp = r.boolean(tbl.get("thp", True), f"{key}.thp")
    if "thp" in tbl and backing is not Backing.ANONYMOUS:
        raise r.fail(f"{key}.thp", 'only valid with backing = "anonymous"')
    path = None
    if "path" in tbl:
        if backing is not Backing.FILE:
            raise r.fail(f"{key}.path", 'only valid with backing = "file"')
        path = r.path(tbl["path"], f"{key}.path")
    addr = r.size(tbl["addr"], f"{key}.addr") if "addr" in tbl else default_addr
    if addr + size > ADDRESS_LIMIT:
        raise r.fail(f"{key}.addr", f"device ends beyond the 48-bit address space ({addr + size:#x})")
    try:
        check_addr(dev_id, addr, size, bs)
    except PropertyError as err:
        raise r.fail(f"{key}.addr", refusal(err, tbl.get("addr", addr))) from None
    requested = read_requested(r, tbl.get("requested-size", 0), f"{key}.requested-size", bs, size)
    dynamic = r.boolean(tbl.get("dynamic-memslots", False), f"{key}.dynamic-memslots")
    limit = r.integer(tbl.get("memslot-limit", 0), f"{key}.memslot-limit", 0, 1 << 20)
    if "memslot-limit" in tbl and not dynamic:
        raise r.fail(f"{key}.memslot-limit", "only valid with dynamic-memslots = true")
    prealloc = r.boolean(tbl.get("prealloc", False), f"{key}.prealloc")
    overwrite = r.boolean(tbl.get("overwrite", False), f"{key}.overwrite")
    if "overwrite" in tbl and backing is not Backing.FILE:
        raise r.fail(f"{key}.overwrite", 'only valid with backing = "file"')
    return DeviceSpec(
        id=dev_id, size=size, block_size=bs, backing=backing, thp=thp, path=path, addr=addr,
        requested_size=requested, dynamic_memslots=dynamic, memslot_limit=limit, prealloc=prealloc,
        overwrite=overwrite,
    )  # fmt: skip


def read_requested(r: Reader, raw: object, key: str, block_size: int, size: int) -> int:
    """A ``requested-size`` for a device of ``size`` bytes in blocks of ``block_size``,
    as the device's own check judges it."""
    requested = r.size(raw, key)
    try:
        check_requested(key, requested, block_size, size)
    except PropertyError as err:
        raise r.fail(key, refusal(err, raw)) from None
    return requested
