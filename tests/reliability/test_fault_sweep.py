"""Fault-injection sweep: every host operation of whole scenarios fails once, in turn.

For each scenario (plug, unplug, unplug-all, attach, detach, migrate, restore) over a
real RAM block, a virtio-mem device with prealloc, a RamDiscardListener and a vfio
container pinning through io_uring (real pins, VmPin), the test first counts the host
operations (``faults.counting()``), then rebuilds the world and fails call N (any
operation) for every N. After each injected failure it checks:

* the documented outcome (a request answers BUSY; attach/migrate/restore raise the
  documented error; with no fault fired, the normal result);
* device, listener and container agree (container mappings == populated ∩ sections,
  pinned bytes == mapped bytes), no memory resident outside plugged blocks, resident
  bytes == plugged bytes, VmPin grew by exactly the container's pins;
* after teardown, no file descriptor or mapping leaked.

The number of injection points swept is reported (``-s`` shows it) and asserted > 0.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from ramdiscard import faults
from ramdiscard.consumers import vfio
from ramdiscard.consumers.dma import iouring
from ramdiscard.errors import HostMemoryError
from ramdiscard.fuzz.invariants import ViewListener, check_container, check_device, check_residency
from ramdiscard.hostmem import RamBlock
from ramdiscard.hostmem.measure import mapping_count, open_fd_count, proc_status
from ramdiscard.memory import AddressSpace, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType, StateError, VirtioMem
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import GiB, MiB

SIZE = 32 * MiB
BS = 2 * MiB
ADDR = 4 * GiB
_ok, _why = iouring.available()
pytestmark = pytest.mark.skipif(not _ok, reason=f"io_uring pins unavailable: {_why}")


class World:
    """RAM block, device (prealloc), listener, address space, container (io_uring)."""

    def __init__(
        self,
        *,
        attach: bool = True,
        plugged: tuple[tuple[int, int], ...] = (),
        prealloc: bool = True,
        kvm: bool = False,
    ):
        self.ram = RamBlock(SIZE, "anonymous", thp=False)
        self.policy = DiscardPolicy()
        self.mr = MemoryRegion.new_ram("sweep", self.ram)
        self.dev = VirtioMem(
            self.mr,
            addr=ADDR,
            block_size=BS,
            requested_size=SIZE // 2,
            policy=self.policy,
            prealloc=prealloc,
            dynamic_memslots=kvm,
        )
        self.root = MemoryRegion.new_container("sweep-root", ADDR + SIZE)
        self.root.add_subregion(ADDR, self.dev.device_region)
        self.space = AddressSpace("sweep", self.root)
        self.kvm = None
        if kvm:
            from ramdiscard.consumers.kvm.memslots import KvmMemslots

            self.kvm = KvmMemslots()
            self.kvm.attach(self.space)
        self.listener = ViewListener(block_size=BS, name="sweep")
        self.dev.register_listener(self.listener, MemoryRegionSection(self.mr, 0, SIZE, ADDR))
        self.backend = iouring.IoUringDmaBackend(slots_per_ring=4)  # pins spill into new rings
        self.container = vfio.VfioContainer(self.backend, policy=self.policy)
        if attach:
            self.container.attach(self.space)
        for first, nb in plugged:
            assert self.dev.plug(ADDR + first * BS, nb) is ResponseType.ACK
            self.ram.view[first * BS] = 1  # the guest uses it

    def check(self, vmpin_base: int) -> None:
        dev = self.dev
        check_device(dev, [self.listener])
        check_residency(dev)
        resident = self.ram.resident_bytes()
        assert resident == dev.plugged_size, f"resident {resident:#x} != plugged {dev.plugged_size:#x}"
        if self.container.address_space is not None:
            check_container(self.container, dev)
            assert self.backend.pinned_bytes == dev.plugged_size
        else:
            assert self.backend.pinned_bytes == 0 and self.container.mapping_count == 0
        if self.kvm is not None:
            want = {(s.offset_within_address_space, s.size) for s in self.space.flatview() if s.mr.is_ram}
            have = {(m.gpa, m.size) for m in self.kvm.slots()}
            assert have == want, f"KVM memslots {have} != RAM sections {want}"
            assert len(want) == self.dev.mapped_memslots
        vmpin = proc_status().vm_pin - vmpin_base
        assert vmpin == self.backend.pinned_bytes, (
            f"VmPin grew {vmpin:#x}, pins {self.backend.pinned_bytes:#x}"
        )

    def close(self) -> None:
        if self.kvm is not None:
            self.kvm.close()
        self.container.close()
        self.backend.close()
        self.root.del_subregion(self.dev.device_region)
        self.space.destroy()
        for lst in self.dev.listeners:
            self.dev.unregister_listener(lst)
        self.dev.unrealize()
        self.ram.close()


@dataclass
class Scenario:
    name: str
    setup: dict[str, object]
    run: Callable[[World], object]
    expect: Callable[[World, object, str | None], None]
    extra_world: dict[str, object] | None = None


def _request(kind: str, first: int, nb: int) -> Callable[[World], object]:
    def run(w: World) -> object:
        if kind == "plug":
            return w.dev.plug(ADDR + first * BS, nb)
        if kind == "unplug":
            return w.dev.unplug(ADDR + first * BS, nb)
        return w.dev.unplug_all()

    return run


def _busy_on_fault(w: World, result: object, fired: str | None) -> None:
    assert result is (ResponseType.ACK if fired is None else ResponseType.BUSY), (
        f"{result!r}, fault in {fired}"
    )


def _busy_on_discard_fault(w: World, result: object, fired: str | None) -> None:
    # Only the host discard can refuse an unplug: what follows it (unpinning, deleting
    # the KVM memslot) happens after the memory is gone and cannot undo the unplug.
    want = ResponseType.BUSY if fired == "discard" else ResponseType.ACK
    assert result is want, f"{result!r}, fault in {fired}"


def _never_fails(w: World, result: object, fired: str | None) -> None:
    assert result is None, f"{result!r} with a fault in {fired}"


def _raises_on_fault(kinds: tuple[type[BaseException], ...]) -> Callable[[World, object, str | None], None]:
    def expect(w: World, result: object, fired: str | None) -> None:
        if fired:
            assert isinstance(result, kinds), f"expected {kinds}, got {result!r}"
        else:
            assert not isinstance(result, BaseException), result

    return expect


def _attach(w: World) -> object:
    return w.container.attach(w.space)


def _detach(w: World) -> object:
    return w.container.detach()


SOURCE_PLUGGED = ((0, 3), (5, 2))


_images: list[bytes] = []


def _source_image() -> bytes:
    """The state of a source device with SOURCE_PLUGGED plugged (made once, no faults)."""
    if not _images:
        src = World(attach=False, plugged=SOURCE_PLUGGED, prealloc=False)
        try:
            _images.append(src.dev.save_state())
        finally:
            src.close()
    return _images[0]


def _migrate_into(w: World) -> object:
    return w.dev.load_state(_source_image())


def _attach_expect(w: World, result: object, fired: str | None) -> None:
    _raises_on_fault((HostMemoryError,))(w, result, fired)
    if fired:
        assert w.container.address_space is None


def _load_expect(w: World, result: object, fired: str | None) -> None:
    _raises_on_fault((StateError,))(w, result, fired)
    if fired:
        assert w.dev.plugged_size == 0


_streams: dict[bool, bytes] = {}


def _saved(sparse: bool) -> bytes:
    """A migration stream (or sparse snapshot file) of a source with SOURCE_PLUGGED
    plugged and written (made once, no faults)."""
    from ramdiscard.migration import save

    if sparse not in _streams:
        src = World(attach=False, plugged=SOURCE_PLUGGED, prealloc=False)
        try:
            with tempfile.TemporaryFile() as f:
                save(src.space, [src.dev], f if sparse else _Buffer(f), sparse=sparse)
                f.seek(0)
                _streams[sparse] = f.read()
        finally:
            src.close()
    return _streams[sparse]


class _Buffer(io.RawIOBase):
    """A non-seekable writer, so save() writes a plain stream."""

    def __init__(self, f: object) -> None:
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b: object) -> int:
        return self.f.write(b)  # type: ignore[attr-defined,no-any-return]


def _save(sparse: bool) -> Callable[[World], object]:
    def run(w: World) -> object:
        from ramdiscard.migration import save

        with tempfile.TemporaryFile() as f:
            return save(w.space, [w.dev], f, sparse=sparse)

    return run


def _load(sparse: bool) -> Callable[[World], object]:
    def run(w: World) -> object:
        from ramdiscard.migration import load

        data = _saved(sparse)
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            return load(w.space, [w.dev], f if sparse else io.BytesIO(data))

    return run


def _save_expect(w: World, result: object, fired: str | None) -> None:
    from ramdiscard.migration import MigrationError

    _raises_on_fault((OSError, MigrationError))(w, result, fired)
    assert not w.dev.is_busy(), "the device stays frozen after a save"
    assert w.dev.plugged_size == sum(nb for _, nb in ((0, 3), (6, 2))) * BS


def _mig_load_expect(w: World, result: object, fired: str | None) -> None:
    from ramdiscard.migration import MigrationError

    _raises_on_fault((MigrationError,))(w, result, fired)
    assert not w.dev.is_busy(), "the device stays frozen after a load"
    if fired:
        assert w.dev.plugged_size == 0 and w.dev.requested_size == SIZE // 2


SCENARIOS = [
    Scenario("plug", {"plugged": ((0, 2),)}, _request("plug", 4, 4), _busy_on_fault),
    Scenario("unplug", {"plugged": ((0, 8),)}, _request("unplug", 2, 4), _busy_on_discard_fault),
    Scenario(
        "unplug_all", {"plugged": ((0, 4), (6, 2))}, _request("unplug_all", 0, 0), _busy_on_discard_fault
    ),
    Scenario("attach", {"attach": False, "plugged": ((0, 3), (6, 2))}, _attach, _attach_expect),
    Scenario("detach", {"plugged": ((0, 3), (6, 2))}, _detach, _never_fails),
    Scenario("migrate", {"prealloc": False}, _migrate_into, _load_expect),
    Scenario("restore", {"prealloc": True}, _migrate_into, _load_expect),
    Scenario("plug_memslot", {"kvm": True}, _request("plug", 0, 4), _busy_on_fault),
    Scenario(
        "unplug_memslot",
        {"kvm": True, "plugged": ((0, 4),)},
        _request("unplug", 0, 4),
        _busy_on_discard_fault,
    ),
    Scenario("migrate_memslot", {"kvm": True, "prealloc": False}, _migrate_into, _load_expect),
    Scenario("save_stream", {"plugged": ((0, 3), (6, 2))}, _save(False), _save_expect),
    Scenario("save_snapshot", {"plugged": ((0, 3), (6, 2))}, _save(True), _save_expect),
    Scenario("load_stream", {"prealloc": False}, _load(False), _mig_load_expect),
    Scenario("load_snapshot", {"prealloc": False}, _load(True), _mig_load_expect),
]


def _call(fn: Callable[[World], object], w: World) -> object:
    try:
        return fn(w)
    except Exception as exc:
        return exc


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_fault_sweep(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    if scenario.setup.get("kvm") and not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("/dev/kvm is not available")
    _source_image()
    if scenario.name.startswith("load_"):
        _saved(scenario.name == "load_snapshot")
    w = World(**scenario.setup)  # type: ignore[arg-type]
    try:
        with faults.counting() as log:
            result = _call(scenario.run, w)
        scenario.expect(w, result, None)
    finally:
        w.close()
    total = log.total
    assert total > 0, "the scenario performs no host operation"
    failures: list[str] = []
    for n in range(1, total + 1):
        gc.collect()
        fds, maps, vmpin = open_fd_count(), mapping_count(), proc_status().vm_pin
        w = World(**scenario.setup)  # type: ignore[arg-type]
        try:
            with faults.inject(None, nth=n, errno=errno.EIO) as plan:
                result = _call(scenario.run, w)
            try:
                scenario.expect(w, result, str(log.sequence[n - 1]) if plan.fired else None)
                w.check(vmpin)
            except AssertionError as exc:
                failures.append(f"call {n}/{total}: {exc}")
        finally:
            w.close()
        # A traceback keeps frames (and memoryviews of guest memory) alive until it is
        # dropped; only what outlives it is a leak.
        del result
        gc.collect()
        if (open_fd_count(), mapping_count()) != (fds, maps):
            failures.append(
                f"call {n}/{total}: leaked fds {open_fd_count() - fds}, maps {mapping_count() - maps}"
            )
    with capsys.disabled():
        print(f"\n[fault sweep] {scenario.name}: {total} injection points {dict(log.counts)}")
    assert not failures, "\n".join(failures)
