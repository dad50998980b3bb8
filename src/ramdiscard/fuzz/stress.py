"""Concurrency stress: several threads drive one virtio-mem device at once while a checker
thread verifies the invariants continuously.

Rules:

* Workers (each with its own seeded PRNG): two guest threads issuing PLUG / UNPLUG /
  STATE / UNPLUG_ALL requests (and writing to what they plugged, under the device lock);
  a host thread changing ``requested_size`` and toggling the busy flag (a migration in
  progress); a listener thread registering and unregistering RamDiscardListeners on
  random sections; a topology thread mapping and unmapping the device region and
  attaching/detaching DMA-style memory listeners (which register RamDiscardListeners from
  ``region_add``, under the topology lock); a state thread saving the device state and
  checking each image (and now and then a whole migration save, during which the
  device is frozen); a reset thread doing occasional device and system resets.
* The checker takes the device lock and runs
  :func:`~ramdiscard.fuzz.invariants.check_device` over every registered listener, and
  every 20th time :func:`~ramdiscard.fuzz.invariants.check_residency`.
* Only documented outcomes are accepted: a 10-byte response of a known type, and for
  each operation the exceptions its contract names. Anything else is an *error*.
* No wait is unbounded: workers poll a stop event; at the end each thread is joined with
  a timeout, and a thread still alive is a *hang*: every thread's stack is dumped
  (faulthandler) into the result, which then fails.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib.util
import io
import random
import struct
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ramdiscard.errors import ListenerError
from ramdiscard.fuzz.invariants import PAGE, ViewListener, check_container, check_device, check_residency
from ramdiscard.fuzz.targets.virtio import ADDR, BS, NB, SIZE, new_ram
from ramdiscard.interfaces import MappedMemory
from ramdiscard.memory import AddressSpace, MemoryListener, MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import DeviceBroken, VirtioMem, decode_state
from ramdiscard.rdm import DiscardPolicy, manager_of

_REQ = struct.Struct("<H6xQH6x")


@dataclass
class StressResult:
    seconds: float = 0.0
    ops: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    iterations: dict[str, int] = field(default_factory=dict)
    """Bodies each worker completed (the checker included), by worker name."""

    @property
    def ok(self) -> bool:
        return not (self.violations or self.errors or self.hung)

    @property
    def total_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def ops_per_second(self) -> float:
        return self.total_ops / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items()))
        lines = [
            f"stress: {self.total_ops} operations in {self.seconds:.1f} s "
            f"({self.ops_per_second:.0f} ops/s), {self.checks} invariant checks, "
            f"{len(self.violations)} violations, {len(self.errors)} errors, {len(self.hung)} hung threads",
            f"  {kinds}",
        ]
        lines += [f"  VIOLATION {v}" for v in self.violations[:5]]
        lines += [f"  ERROR {e}" for e in self.errors[:5]]
        lines += [f"  HUNG {h}" for h in self.hung[:1]]
        return "\n".join(lines)


class DmaListener(MemoryListener):
    """A DMA-style memory listener: one ViewListener per RAM section that has a manager."""

    def __init__(self) -> None:
        self.rdls: dict[MemoryRegionSection, ViewListener] = {}

    def region_add(self, section: MemoryRegionSection) -> None:
        rdm = manager_of(section.mr)
        if rdm is None:
            return
        rdl = ViewListener(block_size=BS, name="dma")
        rdm.register_listener(rdl, section)
        self.rdls[section] = rdl

    def region_del(self, section: MemoryRegionSection) -> None:
        rdl = self.rdls.pop(section, None)
        if rdl is not None and rdl.manager is not None:
            rdl.manager.unregister_listener(rdl)
            if rdl.view.any():
                raise AssertionError("a DMA listener holds memory after region_del")


class _Stress:
    def __init__(self, result: StressResult, seed: int, dynamic_memslots: bool) -> None:
        self.result = result
        self.seed = seed
        self.stop = threading.Event()
        self.busy = False
        self.ram = new_ram(SIZE)
        self.policy = DiscardPolicy()
        self.mr = MemoryRegion.new_ram("stress-vmem", self.ram)
        self.dev = VirtioMem(
            self.mr,
            addr=ADDR,
            block_size=BS,
            requested_size=SIZE // 2,
            policy=self.policy,
            dynamic_memslots=dynamic_memslots,
            usable_extent=2 * BS,
            busy=self._busy,
        )
        self.root = MemoryRegion.new_container("stress-root", ADDR + SIZE)
        self.space = AddressSpace("stress", self.root)
        self.counts_lock = threading.Lock()
        self.dma: list[DmaListener] = []
        self.migration: Any = None
        if importlib.util.find_spec("ramdiscard.migration") is not None:
            import ramdiscard.migration

            self.migration = ramdiscard.migration
        self.container: Any = None
        if importlib.util.find_spec("ramdiscard.consumers.vfio") is not None:
            from ramdiscard.consumers.dma import NullDmaBackend
            from ramdiscard.consumers.vfio import VfioContainer

            self.container = VfioContainer(NullDmaBackend(), policy=self.policy)

    def _busy(self) -> bool:
        return self.busy

    # -- bookkeeping ------------------------------------------------------------------------

    def count(self, kind: str) -> None:
        with self.counts_lock:
            self.result.ops[kind] += 1

    def error(self, what: str) -> None:
        with self.counts_lock:
            self.result.errors.append(what)

    def loop(
        self, name: str, body: Callable[[random.Random], None], pause: float = 0.0, limit: int | None = None
    ) -> Callable[[], None]:
        def run() -> None:
            rng = random.Random(f"{self.seed}-{name}")
            done = 0
            while not self.stop.is_set() and (limit is None or done < limit):
                done += 1
                try:
                    body(rng)
                except AssertionError as exc:
                    with self.counts_lock:
                        self.result.violations.append(f"{name}: {exc}")
                except Exception:
                    self.error(f"{name}: {traceback.format_exc(limit=6)}")
                if pause:
                    self.stop.wait(pause)
            with self.counts_lock:
                self.result.iterations[name] = done

        return run

    # -- workers --------------------------------------------------------------------------------

    def guest(self, rng: random.Random) -> None:
        kind = rng.choices((0, 1, 2, 3), (6, 5, 1, 2))[0]
        first = rng.randrange(-1, NB + 1)
        nb = rng.randint(1, 6)
        raw = _REQ.pack(kind, max(0, ADDR + first * BS), nb)
        try:
            out = self.dev.handle_request(raw)
        except DeviceBroken:
            self.count("request:broken")
            return
        assert len(out) == 10, f"response of {len(out)} bytes"
        rtype = struct.unpack_from("<H", out)[0]
        assert rtype in (0, 1, 2, 3), f"unknown response type {rtype}"
        self.count(f"request:{('plug', 'unplug', 'unplug_all', 'state')[kind]}")
        if kind == 0 and rtype == 0 and isinstance(self.ram, MappedMemory):
            view = self.ram.view
            with self.dev.lock:
                for b in range(first, first + nb):
                    if self.dev.is_range_populated(b * BS, BS):
                        view[b * BS] = 0x5A

    def host(self, rng: random.Random) -> None:
        if rng.random() < 0.05:
            self.busy = True
            time.sleep(0.0005)
            self.busy = False
            self.count("busy")
        else:
            self.dev.requested_size = rng.randrange(NB + 1) * BS
            self.count("requested_size")

    def listeners(self, rng: random.Random) -> None:
        start = rng.randrange(SIZE // PAGE)
        pages = rng.randint(1, SIZE // PAGE - start)
        lst = ViewListener(double_discard=rng.random() < 0.5, block_size=BS, name="churn")
        self.dev.register_listener(
            lst, MemoryRegionSection(self.mr, start * PAGE, pages * PAGE, ADDR + start * PAGE)
        )
        self.count("register")
        time.sleep(rng.random() * 0.002)
        self.dev.unregister_listener(lst)
        assert not lst.view.any(), "a listener holds memory after unregistration"
        assert not lst.errors, lst.errors[:2]
        self.count("unregister")

    def topology(self, rng: random.Random) -> None:
        region = self.dev.device_region
        choice = rng.random()
        if choice < 0.4:
            if region.container is None:
                self.root.add_subregion(ADDR, region)
                self.count("map")
            else:
                self.root.del_subregion(region)
                self.count("unmap")
        elif choice < 0.7 or not self.dma:
            dma = DmaListener()
            self.space.register_listener(dma)
            self.dma.append(dma)
            self.count("attach")
        else:
            dma = self.dma.pop(rng.randrange(len(self.dma)))
            self.space.unregister_listener(dma)
            assert not dma.rdls, "a DMA listener kept sections after detach"
            self.count("detach")
        if len(self.dma) > 3:
            dma = self.dma.pop(0)
            self.space.unregister_listener(dma)
            self.count("detach")

    def vfio(self, rng: random.Random) -> None:
        c = self.container
        if c is None:
            self.stop.wait(0.01)
            return
        if c.address_space is None:
            c.attach(self.space)
            self.count("vfio_attach")
        else:
            c.detach()
            assert c.mapping_count == 0 and c.backend.pinned_bytes == 0, "detach left mappings or pins"
            self.count("vfio_detach")
        time.sleep(rng.random() * 0.002)

    def state(self, rng: random.Random) -> None:
        if self.migration and rng.random() < 0.1:
            # A whole migration save: the device answers BUSY meanwhile, then its own
            # busy predicate must be back.
            stats = self.migration.save(self.space, [self.dev], io.BytesIO())
            assert stats.page_bytes % BS == 0, stats
            assert self.dev.busy_predicate == self._busy, "a migration save left the device frozen"
            self.count("migrate_save")
            return
        image = decode_state(self.dev.save_state())
        bits = int.from_bytes(image.bitmap, "little")
        assert bits.bit_count() * BS == image.plugged_size, "image plugged size != bitmap"
        assert bits >> (image.usable_region_size // BS) == 0, "image has blocks beyond the usable region"
        self.count("save_state")

    def resets(self, rng: random.Random) -> None:
        if rng.random() < 0.2:
            self.dev.system_reset()
            self.count("system_reset")
        else:
            self.dev.device_reset()
            self.count("device_reset")

    def checker(self, rng: random.Random) -> None:
        with self.dev.lock:
            views = [lst for lst in self.dev.listeners if isinstance(lst, ViewListener)]
            check_device(self.dev, views)
            if self.container is not None and self.container.address_space is not None:
                check_container(self.container, self.dev)
            self.result.checks += 1
            if self.result.checks % 20 == 0:
                check_residency(self.dev)

    # -- run ------------------------------------------------------------------------------------

    def run(self, seconds: float, threads: int, join_timeout: float, iterations: int | None = None) -> None:
        every: list[tuple[str, Callable[[random.Random], None], float]] = [
            ("guest0", self.guest, 0.0),
            ("guest1", self.guest, 0.0),
            ("host", self.host, 0.001),
            ("listeners", self.listeners, 0.0),
            ("topology", self.topology, 0.0),
            ("state", self.state, 0.001),
            ("resets", self.resets, 0.02),
            ("vfio", self.vfio, 0.0),
        ]
        workers = every[: max(1, threads)]
        workers.append(("checker", self.checker, 0.0005))
        pool = [
            threading.Thread(
                target=self.loop(name, body, pause, None if name == "checker" else iterations),
                name=f"stress-{name}",
                daemon=True,
            )
            for name, body, pause in workers
        ]
        start = time.monotonic()
        for t in pool:
            t.start()
        if iterations is None:
            self.stop.wait(seconds)
        else:
            end = start + seconds
            for t in pool[:-1]:
                t.join(max(0.0, end - time.monotonic()))
        self.stop.set()
        deadline = time.monotonic() + join_timeout
        for t in pool:
            t.join(max(0.0, deadline - time.monotonic()))
        self.result.seconds = time.monotonic() - start
        alive = [t.name for t in pool if t.is_alive()]
        if alive:
            with tempfile.TemporaryFile("w+") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                stacks = f.read()
            self.result.hung.append(f"threads still running after {join_timeout} s: {alive}\n{stacks}")
            return
        with self.dev.lock:
            check_device(self.dev, [x for x in self.dev.listeners if isinstance(x, ViewListener)])
            check_residency(self.dev)
            if self.container is not None and self.container.address_space is not None:
                check_container(self.container, self.dev)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.dev.device_region.container is not None:
                self.root.del_subregion(self.dev.device_region)
        if self.container is not None:
            with contextlib.suppress(Exception):
                self.container.close()
        for dma in self.dma:
            with contextlib.suppress(Exception):
                self.space.unregister_listener(dma)
        self.space.destroy()
        for lst in self.dev.listeners:
            with contextlib.suppress(ListenerError):
                self.dev.unregister_listener(lst)
        self.dev.unrealize()
        self.ram.close()


def run_stress(
    *,
    seconds: float = 5.0,
    threads: int = 8,
    seed: int = 0,
    dynamic_memslots: bool = True,
    join_timeout: float = 10.0,
    iterations: int | None = None,
) -> StressResult:
    """Run the stress for ``seconds``; see the module rules. ``threads`` caps the number
    of workers (the checker always runs). With ``iterations`` each worker stops after that
    many bodies and the run ends when all have (``seconds`` is then only the bound; a
    worker that has not finished by then is stopped early, see ``result.iterations``)."""
    result = StressResult()
    s = _Stress(result, seed, dynamic_memslots)
    try:
        s.run(seconds, threads, join_timeout, iterations)
    except AssertionError as exc:
        result.violations.append(f"final check: {exc}")
    finally:
        if not result.hung:
            s.close()
    return result
