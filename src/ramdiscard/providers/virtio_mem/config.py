"""virtio-mem device properties: defaults, checks and derived geometry (no state).

Rules (QEMU's realize-time checks, in its order):

* ``memdev`` is a RAM region with a RAM block that can discard and populate
  (:class:`HostRam`).
* ``node`` < ``numa_nodes`` (0 without NUMA); ``dynamic-memslots`` needs
  ``unplugged-inaccessible``; the usable extent is not negative.
* ``block-size``: default :func:`default_block_size`; an explicit one is a power of two,
  at least 1 MiB and at least the backing page size (below the default only warns)
  (:func:`check_block_size`).
* The region size is a multiple of the block size (:func:`check_region_size`); ``addr``
  is block aligned and the region ends inside the 64-bit space (:func:`check_addr`);
  ``requested-size`` is valid
  (:func:`~ramdiscard.providers.virtio_mem.state.check_requested`).

Every failed check raises InvalidArgument with a one-line message naming the device; the
property checks raise its subclass
:class:`~ramdiscard.providers.virtio_mem.state.PropertyError`, which also names the
property and the rule, so that others describing the same properties (a scenario file)
ask these functions instead of checking again.
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Callable

from ramdiscard.errors import InvalidArgument, ProtocolViolation
from ramdiscard.interfaces import DiscardableMemory as HostRam
from ramdiscard.memory.region import MemoryRegion
from ramdiscard.providers.virtio_mem.state import PropertyError, Rule, check_requested
from ramdiscard.providers.virtio_mem.wire import (
    U64_MAX,
    VIRTIO_MEM_F_ACPI_PXM,
    VIRTIO_MEM_F_PERSISTENT_SUSPEND,
    VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
    VirtioMemError,
    feature_bit,
)
from ramdiscard.rdm.aggregate import AggregateManager
from ramdiscard.units import GiB, MiB, align_up, is_power_of_2

log = logging.getLogger("ramdiscard.providers.virtio_mem")

USABLE_EXTENT_X86 = 256 * MiB
"""Added to ``requested_size`` when sizing the usable region (x86/s390x; arm uses 1 GiB)."""
MIN_BLOCK_SIZE = 1 * MiB
MIN_MEMSLOT_SIZE = 1 * GiB


class FeatureError(VirtioMemError, ProtocolViolation):
    """Feature negotiation failed (a required feature was not accepted, or an unknown one
    was); the driver must not operate the device."""


def host_page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def thp_size() -> int:
    """The THP (PMD) size QEMU would use as the default block size on this host.

    Reads ``hpage_pmd_size``; without THP support (file absent) 1 MiB; an unreadable or
    non-power-of-two value falls back to the architecture default.
    """
    path = "/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"
    if not os.path.exists(path):
        return MIN_BLOCK_SIZE
    try:
        with open(path) as f:
            value = int(f.read().strip())
        if is_power_of_2(value):
            return value
    except (OSError, ValueError):
        pass
    machine = platform.machine()
    if machine in ("x86_64", "ppc64", "ppc64le"):
        return 2 * MiB
    if machine in ("aarch64", "arm64"):
        return {4096: 2 * MiB, 16384: 32 * MiB, 65536: 512 * MiB}.get(host_page_size(), 2 * MiB)
    return MIN_BLOCK_SIZE


def default_block_size(page_size: int) -> int:
    """QEMU's default: max(page size, THP size) for base pages, max(page size, 1 MiB) for
    huge pages, never below 1 MiB."""
    if page_size == host_page_size():
        return max(page_size, thp_size(), MIN_BLOCK_SIZE)
    return max(page_size, MIN_BLOCK_SIZE)


def memslot_geometry(region_size: int, block_size: int, limit: int | None) -> tuple[int, int]:
    """(memslot size, memslot count) for dynamic memslots (qemu-ram-discard §3.9).

    ``limit`` None means unlimited. A limit of 1 or less gives one memslot.
    """
    if limit is not None and limit <= 1:
        return region_size, 1
    minimum = max(block_size, MIN_MEMSLOT_SIZE)
    size = minimum if limit is None else max(align_up(-(-region_size // limit), block_size), minimum)
    if size >= region_size:
        return region_size, 1
    return size, -(-region_size // size)


def check_memdev(prefix: str, memory: object, is_device: Callable[[object], bool]) -> HostRam:
    """The RAM block of ``memory`` if it can back a device: a RAM region whose RAM block
    can discard and populate, not already used by a device (``is_device`` says whether a
    manager of the region, or a source of its aggregate, is one). InvalidArgument otherwise."""
    if not isinstance(memory, MemoryRegion) or not memory.is_ram or memory.ram is None:
        raise InvalidArgument(f"{prefix}: memdev must be a RAM memory region with a RAM block")
    ram = memory.ram
    if not isinstance(ram, HostRam):
        raise InvalidArgument(f"{prefix}: RAM block {ram!r} cannot discard/populate memory")
    current = memory.ram_discard_manager
    users = current.sources if isinstance(current, AggregateManager) else (current,)
    if any(is_device(user) for user in users):
        raise InvalidArgument(f"{prefix}: memdev {memory.name!r} is busy (used by another virtio-mem)")
    return ram


def check_block_size(prefix: str, block_size: int | None, page_size: int) -> int:
    """The block size to use for a memory backend of ``page_size`` pages: ``block_size``
    if valid, :func:`default_block_size` if None. PropertyError if it is below 1 MiB, not
    a power of two or below the page size."""
    if block_size is None:
        return default_block_size(page_size)
    if block_size < MIN_BLOCK_SIZE:
        raise PropertyError(
            f"{prefix}: block-size must be at least 1 MiB, got {block_size:#x}",
            prop="block-size", rule=Rule.BELOW_MINIMUM, limit=MIN_BLOCK_SIZE,
        )  # fmt: skip
    if not is_power_of_2(block_size):
        raise PropertyError(
            f"{prefix}: block-size must be a power of two, got {block_size:#x}",
            prop="block-size", rule=Rule.NOT_POWER_OF_TWO,
        )  # fmt: skip
    if block_size < page_size:
        raise PropertyError(
            f"{prefix}: block-size has to be at least the page size of memdev ({page_size:#x})",
            prop="block-size", rule=Rule.BELOW_PAGE_SIZE, limit=page_size,
        )  # fmt: skip
    return block_size


def check_region_size(prefix: str, region_size: int, block_size: int) -> None:
    """PropertyError (``prop`` "size") unless the memory backend size is a multiple of
    ``block_size``."""
    if region_size % block_size:
        raise PropertyError(
            f"{prefix}: memory backend size must be a multiple of block-size ({block_size:#x})",
            prop="size", rule=Rule.NOT_BLOCK_MULTIPLE, limit=block_size,
        )  # fmt: skip


def check_addr(prefix: str, addr: int, region_size: int, block_size: int) -> None:
    """PropertyError (``prop`` "addr") unless ``addr`` is a non-negative multiple of
    ``block_size`` and the region ends inside the 64-bit address space."""
    if addr < 0 or addr % block_size:
        raise PropertyError(
            f"{prefix}: addr must be a multiple of block-size ({block_size:#x})",
            prop="addr", rule=Rule.NOT_BLOCK_MULTIPLE, limit=block_size,
        )  # fmt: skip
    if addr + region_size > U64_MAX + 1:
        raise PropertyError(
            f"{prefix}: addr {addr:#x} + size {region_size:#x} ends beyond the 64-bit address space",
            prop="addr", rule=Rule.BEYOND_ADDRESS_SPACE, limit=U64_MAX + 1,
        )  # fmt: skip


def check_properties(
    prefix: str,
    *,
    page_size: int,
    region_size: int,
    addr: int,
    block_size: int | None,
    requested_size: int,
    node: int,
    numa_nodes: int,
    unplugged_inaccessible: bool,
    dynamic_memslots: bool,
    usable_extent: int,
) -> int:
    """Check the device properties (module rules) and return the block size to use."""
    if numa_nodes < 0 or (node >= numa_nodes if numa_nodes else node != 0):
        raise InvalidArgument(f"{prefix}: node {node} is not a valid NUMA node (numa nodes: {numa_nodes})")
    if dynamic_memslots and not unplugged_inaccessible:
        raise InvalidArgument(f"{prefix}: dynamic-memslots requires unplugged-inaccessible=on")
    if usable_extent < 0:
        raise InvalidArgument(f"{prefix}: negative usable extent")
    block_size = check_block_size(prefix, block_size, page_size)
    default_bs = default_block_size(page_size)
    if block_size < default_bs:
        log.warning("%s: block-size %#x is below the default %#x", prefix, block_size, default_bs)
    check_region_size(prefix, region_size, block_size)
    check_addr(prefix, addr, region_size, block_size)
    check_requested(prefix, requested_size, block_size, region_size)
    return block_size


def host_features(numa: bool, unplugged_inaccessible: bool, persistent_suspend: bool) -> int:
    """The device feature bits offered for these properties."""
    features = 0
    if numa:
        features |= feature_bit(VIRTIO_MEM_F_ACPI_PXM)
    if unplugged_inaccessible:
        features |= feature_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    if persistent_suspend:
        features |= feature_bit(VIRTIO_MEM_F_PERSISTENT_SUSPEND)
    return features


def check_driver_features(prefix: str, offered: int, features: int) -> None:
    """Raise FeatureError if the driver accepted a feature not offered or refused an
    offered UNPLUGGED_INACCESSIBLE (D-INIT-1)."""
    if features & ~offered:
        raise FeatureError(f"{prefix}: driver accepted features not offered: {features & ~offered:#x}")
    ui = feature_bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE)
    if offered & ui and not features & ui:
        raise FeatureError(
            f"{prefix}: the driver does not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, "
            "which this device requires"
        )


def check_unplug(prefix: str, unplugged_inaccessible: bool, plugged_size: int, requested_size: int) -> None:
    """QEMU's device hot-unplug preconditions; InvalidArgument when refused."""
    if not unplugged_inaccessible:
        raise InvalidArgument(f"{prefix}: unplug requires unplugged-inaccessible=on")
    if plugged_size or requested_size:
        raise InvalidArgument(
            f"{prefix}: unplug requires 'size' and 'requested-size' to be 0 "
            f"(size {plugged_size:#x}, requested-size {requested_size:#x})"
        )
