"""Fault-injection sweep over guest_memfd conversions (the second RamDiscardManager).

A RAM region with :class:`RamBlockAttributes` over a real guest_memfd (when the host
offers one) and a vfio container pinning the shared side through io_uring. For every
host call of a conversion (KVM attributes, pins/unpins, the discard of the shared side,
the guest_memfd punch), the call fails once; afterwards:

* a failure before the state change (attributes ioctl, a pin refusing the populate)
  raises and changes nothing;
* a failure after it (freeing the side that was left) raises HostMemoryError with the
  state converted and that memory not freed (the documented contract of ``convert``);
* an unpin failure cannot fail the conversion (a discard is irrefutable);
* always: listener view == shared ∩ section, container mappings == shared ∩ section,
  pins == mapped == shared bytes, VmPin grew by exactly the pins, no fd or mapping leaks;
  when nothing failed after the state change, RSS of the shared side == shared bytes.
"""

from __future__ import annotations

import errno
import gc
from collections.abc import Callable

import pytest

from ramdiscard import faults
from ramdiscard.consumers import vfio
from ramdiscard.consumers.dma import iouring
from ramdiscard.errors import HostMemoryError
from ramdiscard.fuzz.invariants import ViewListener, check_container, check_listeners
from ramdiscard.hostmem import RamBlock
from ramdiscard.hostmem.measure import mapping_count, open_fd_count, proc_status
from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection
from ramdiscard.providers import attributes
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

_ok, _why = iouring.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"io_uring pins unavailable: {_why}")

SIZE = 8 * MiB
GPA = 4 * GiB
PG = 4096
SHARED_AT_START = ((0, 16), (64, 32))  # (first page, pages)


class AttrWorld:
    def __init__(self) -> None:
        self.ram = RamBlock(SIZE, "anonymous", thp=False)
        self.policy = DiscardPolicy()
        self.mr = MemoryRegion.new_ram("gmem", self.ram)
        self.attrs = attributes.RamBlockAttributes(self.mr, policy=self.policy, slot=None, gpa=GPA)
        self.root = MemoryRegion.new_container("gmem-root", GPA + SIZE)
        self.root.add_subregion(GPA, self.mr)
        self.space = AddressSpace("gmem", self.root)
        self.listener = ViewListener(block_size=PG, name="gmem")
        self.attrs.register_listener(self.listener, MemoryRegionSection(self.mr, 0, SIZE, GPA))
        self.backend = iouring.IoUringDmaBackend(slots_per_ring=8)
        self.container = vfio.VfioContainer(self.backend, policy=self.policy)
        self.container.attach(self.space)
        for first, pages in SHARED_AT_START:
            self.attrs.convert(first * PG, pages * PG, to_private=False)
            self.ram.view[first * PG] = 1

    def check(self, vmpin_base: int, *, residency: bool) -> None:
        a = self.attrs
        check_listeners(a, [self.listener])
        check_container(self.container, a)
        assert self.backend.pinned_bytes == a.shared_size, (self.backend.pinned_bytes, a.shared_size)
        vmpin = proc_status().vm_pin - vmpin_base
        assert vmpin == self.backend.pinned_bytes, (
            f"VmPin grew {vmpin:#x}, pins {self.backend.pinned_bytes:#x}"
        )
        if residency:
            resident = self.ram.resident_bytes()
            assert resident == a.shared_size, (
                f"shared side resident {resident:#x} != shared {a.shared_size:#x}"
            )

    def close(self) -> None:
        self.container.close()
        self.backend.close()
        self.root.del_subregion(self.mr)
        self.space.destroy()
        for lst in self.attrs.listeners:
            self.attrs.unregister_listener(lst)
        self.attrs.close()
        self.ram.close()


def _convert(first: int, pages: int, to_private: bool) -> Callable[[AttrWorld], object]:
    def run(w: AttrWorld) -> object:
        return w.attrs.convert(first * PG, pages * PG, to_private, prealloc_private=to_private)

    return run


SCENARIOS = {
    "to_shared": _convert(8, 40, False),  # straddles a shared run: only the private part populates
    "to_private": _convert(4, 80, True),  # covers both shared runs
}
AFTER_STATE_CHANGE = {"discard", "populate"}  # freeing / allocating the side that was left


def _call(fn: Callable[[AttrWorld], object], w: AttrWorld) -> object:
    try:
        return fn(w)
    except Exception as exc:
        exc.__traceback__ = None
        return exc


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_conversion_fault_sweep(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    run = SCENARIOS[name]
    w = AttrWorld()
    try:
        before_shared = w.attrs.shared_size
        with faults.counting() as log:
            result = _call(run, w)
        assert result is None, result
        after_shared = w.attrs.shared_size
        w.check(proc_status().vm_pin - w.backend.pinned_bytes, residency=True)
    finally:
        w.close()
    total = log.total
    assert total > 0
    failures: list[str] = []
    for n in range(1, total + 1):
        gc.collect()
        fds, maps, vmpin = open_fd_count(), mapping_count(), proc_status().vm_pin
        w = AttrWorld()
        try:
            with faults.inject(None, nth=n, errno=errno.EIO) as plan:
                result = _call(run, w)
            op = str(log.sequence[n - 1]) if plan.fired else None
            try:
                late = op in AFTER_STATE_CHANGE
                if op is None or op == "unpin":
                    assert result is None, f"{result!r} with a fault in {op}"
                    assert w.attrs.shared_size == after_shared
                elif late:
                    assert isinstance(result, HostMemoryError), f"{result!r} with a fault in {op}"
                    assert w.attrs.shared_size == after_shared, "state not converted"
                else:
                    assert isinstance(result, Exception), f"{result!r} with a fault in {op}"
                    assert w.attrs.shared_size == before_shared, "a refused conversion changed state"
                w.check(vmpin, residency=not late)
            except AssertionError as exc:
                failures.append(f"call {n}/{total} ({op}): {exc}")
        finally:
            w.close()
        del result
        gc.collect()
        if (open_fd_count(), mapping_count()) != (fds, maps):
            failures.append(
                f"call {n}/{total}: leaked fds {open_fd_count() - fds}, maps {mapping_count() - maps}"
            )
    with capsys.disabled():
        print(f"\n[fault sweep] convert {name}: {total} injection points {dict(log.counts)}")
    assert not failures, "\n".join(failures)
