"""Invariants shared by the fuzz targets, the fault-injection sweep and the stress run.

Rules:

* Checks raise ``AssertionError`` with a message naming what disagrees; they never change
  state. Call them with the device's lock held when other threads may be running.
* :class:`ViewListener` is a RamDiscardListener that *records* protocol violations
  (a populate of something it already holds, a discard of something it never held while
  not double-discard capable) instead of raising them: raising from a notification would
  be a refusal and hide the bug. Its view is page-granular over its section.
* The central invariants (qemu-ram-discard §2, virtio-mem D-* ids):

  - ``plugged_size == popcount(bitmap) * block_size`` and no plugged block lies beyond
    the usable region;
  - every registered listener's view equals populated ∩ its section;
  - no host memory is resident outside plugged blocks (:func:`check_residency`, on a
    RAM block that can report residency).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ramdiscard.interfaces import MeasurableMemory
from ramdiscard.rdm.listener import RamDiscardListener

if TYPE_CHECKING:
    from ramdiscard.memory.section import MemoryRegionSection
    from ramdiscard.providers.virtio_mem.device import VirtioMem
    from ramdiscard.rdm.block_state import BlockStateManager

PAGE = 4096


class Refused(Exception):
    """Raised by a :class:`ViewListener` to refuse a populate (a modelled DMA failure)."""


class ViewListener(RamDiscardListener):
    """Keeps a page-granular view of what it was told is populated (section-relative).

    ``refuse_blocks``: region block indexes (at ``block_size``) whose populate this
    listener refuses, deterministically, so a test can predict a BUSY.
    """

    def __init__(
        self,
        *,
        double_discard: bool = False,
        block_size: int = 1 << 21,
        refuse_blocks: frozenset[int] = frozenset(),
        name: str = "view",
    ) -> None:
        self.double_discard_supported = double_discard
        self.block_size = block_size
        self.refuse_blocks = refuse_blocks
        self.name = name
        self.view: npt.NDArray[np.bool_] = np.zeros(0, dtype=bool)
        self.errors: list[str] = []
        self.populates = 0
        self.discards = 0

    def __repr__(self) -> str:
        return f"<ViewListener {self.name}>"

    def _slice(self, s: MemoryRegionSection) -> slice:
        sec = self.section
        assert sec is not None
        if self.view.size != sec.size // PAGE:
            self.view = np.zeros(sec.size // PAGE, dtype=bool)
        if s.offset_within_region < sec.offset_within_region or s.end > sec.end:
            self.errors.append(f"{self.name}: notification {s!r} outside the section {sec!r}")
        lo = (s.offset_within_region - sec.offset_within_region) // PAGE
        return slice(max(lo, 0), min(lo + s.size // PAGE, self.view.size))

    def refuses(self, offset: int, size: int, section: MemoryRegionSection | None = None) -> bool:
        """Whether a populate of region range [offset, +size) would be refused, with the
        registered section (or ``section``)."""
        sec = section if section is not None else self.section
        if not self.refuse_blocks or sec is None:
            return False
        part = sec.intersect(offset, size)
        if part is None:
            return False
        first = part.offset_within_region // self.block_size
        last = -(-part.end // self.block_size)
        return any(b in self.refuse_blocks for b in range(first, last))

    def notify_populate(self, section: MemoryRegionSection) -> None:
        if self.refuses(section.offset_within_region, section.size):
            raise Refused(f"{self.name} refuses {section!r}")
        sl = self._slice(section)
        if self.view[sl].any():
            self.errors.append(f"{self.name}: populate of already populated {section!r}")
        self.view[sl] = True
        self.populates += 1

    def notify_discard(self, section: MemoryRegionSection) -> None:
        sl = self._slice(section)
        if not self.double_discard_supported and not self.view[sl].all():
            self.errors.append(f"{self.name}: discard of unpopulated memory {section!r}")
        self.view[sl] = False
        self.discards += 1


def populated_pages(manager: BlockStateManager | VirtioMem) -> npt.NDArray[np.bool_]:
    """Page-granular populated map of the manager's whole region."""
    out = np.zeros(manager.region.size // PAGE, dtype=bool)
    for start, end in manager.populated_runs():
        out[start // PAGE : end // PAGE] = True
    return out


def check_listeners(manager: BlockStateManager | VirtioMem, listeners: Iterable[ViewListener]) -> None:
    """Every registered listener's view == populated ∩ its section; an unregistered one
    holds nothing; no listener saw a protocol violation."""
    with manager.lock:
        pages = populated_pages(manager)
        registered = set(map(id, manager.listeners))
        for lst in listeners:
            assert not lst.errors, f"listener protocol violations: {lst.errors[:3]}"
            sec = lst.section
            if id(lst) not in registered:
                assert sec is None and not lst.view.any(), f"{lst!r} unregistered but holds memory"
                continue
            assert sec is not None
            want = pages[sec.offset_within_region // PAGE : sec.end // PAGE]
            have = lst.view if lst.view.size else np.zeros(want.size, dtype=bool)
            if not np.array_equal(have, want):
                diff = np.flatnonzero(have != want)
                raise AssertionError(
                    f"{lst!r} view differs from populated ∩ section at {diff.size} pages, "
                    f"first page {int(diff[0]) * PAGE + sec.offset_within_region:#x} "
                    f"(listener {bool(have[diff[0]])}, manager {bool(want[diff[0]])})"
                )


def check_device(dev: VirtioMem, listeners: Iterable[ViewListener] = ()) -> None:
    """Sizes, usable region and listener views (see the module rules)."""
    with dev.lock:
        bs = dev.block_size
        count = dev.count_populated(0, dev.region_size)
        assert dev.plugged_size == count, f"plugged_size {dev.plugged_size:#x} != popcount bytes {count:#x}"
        assert dev.plugged_size % bs == 0 and dev.usable_region_size % bs == 0
        assert 0 <= dev.usable_region_size <= dev.region_size
        tail = dev.region_size - dev.usable_region_size
        if tail:
            beyond = dev.count_populated(dev.usable_region_size, tail)
            assert beyond == 0, f"{beyond:#x} bytes plugged beyond the usable region"
        check_listeners(dev, listeners)


def check_residency(dev: VirtioMem) -> None:
    """No host memory resident in unplugged blocks (needs a RAM block with
    ``resident_bytes``; a no-op otherwise)."""
    ram = dev.ram
    if not isinstance(ram, MeasurableMemory):
        return
    with dev.lock:
        for start, end in dev.discarded_runs():
            resident = ram.resident_bytes(start, end - start)
            assert resident == 0, f"{resident:#x} bytes resident in unplugged [{start:#x}, {end:#x})"


def _merge(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(runs):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def check_container(container: object, dev: BlockStateManager | VirtioMem) -> None:
    """A vfio container attached over ``dev`` (a device or any block-state manager): the
    IOVA ranges it maps for the manager's region equal populated ∩ each registered RDM
    section, and its backend pins exactly the mapped bytes (take the manager lock first
    when other threads run; the container lock is taken inside)."""
    from ramdiscard.consumers.vfio import VfioContainer

    assert isinstance(container, VfioContainer)
    with dev.lock:
        want: list[tuple[int, int]] = []
        windows: list[tuple[int, int]] = []
        for rec in container.rdm_sections():
            sec = rec.registered_section
            if sec.mr is not dev.region:
                continue
            windows.append((sec.offset_within_address_space, sec.address_end))
            for start, end in dev.populated_runs():
                part = sec.intersect(start, end - start)
                if part is not None:
                    want.append((part.offset_within_address_space, part.address_end))
        have = [
            (m.iova, m.iova + m.size)
            for m in container.mappings()
            if any(lo <= m.iova < hi for lo, hi in windows)
        ]
        assert _merge(have) == _merge(want), (
            f"container maps {[(hex(a), hex(b)) for a, b in _merge(have)][:4]} but populated ∩ sections is "
            f"{[(hex(a), hex(b)) for a, b in _merge(want)][:4]}"
        )
        mapped = sum(m.size for m in container.mappings())
        assert container.backend.pinned_bytes == mapped, (
            f"backend pins {container.backend.pinned_bytes:#x} bytes, container maps {mapped:#x}"
        )
