"""A confidential VM with hot-pluggable memory: a real VirtioMem and RamBlockAttributes on
one region (the RFC's motivating case). After every plug, unplug and conversion, each
listener's view equals the aggregate (plugged and shared) inside its section."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard import RamBlockAttributes
from ramdiscard.hostmem import RamBlock
from ramdiscard.memory import MemoryRegion, MemoryRegionSection
from ramdiscard.providers.virtio_mem import ResponseType, VirtioMem
from ramdiscard.rdm import AggregateManager, DiscardPolicy
from ramdiscard.units import GiB, MiB
from tests.providers.attributes.attr_helpers import PAGE, PageView, needs_guest_memfd

SIZE = 16 * MiB
BS = 2 * MiB
ADDR = 4 * GiB
PAGES = SIZE // PAGE
BLOCKS = SIZE // BS

step = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, BLOCKS - 1), st.integers(1, 3)),
    st.tuples(st.just("unplug"), st.integers(0, BLOCKS - 1), st.integers(1, 3)),
    st.tuples(st.just("share"), st.integers(0, PAGES - 1), st.integers(1, 1500)),
    st.tuples(st.just("private"), st.integers(0, PAGES - 1), st.integers(1, 1500)),
    st.tuples(st.just("refuse"), st.integers(0, PAGES - 1), st.integers(1, 1500)),
    st.tuples(st.just("unplug_all"), st.just(0), st.just(0)),
)


def scenario(steps: list[tuple[str, int, int]], use_kvm: bool) -> None:
    policy = DiscardPolicy()
    mr = MemoryRegion.new_ram("cvm-ram", RamBlock(SIZE, name="cvm-ram", thp=False))
    vmem = VirtioMem(mr, addr=ADDR, block_size=BS, requested_size=SIZE, policy=policy)
    attrs = RamBlockAttributes(mr, use_kvm=use_kvm, policy=policy)
    assert (attrs.guest_memfd is not None) == use_kvm, attrs.backend_description
    agg = mr.ram_discard_manager
    assert isinstance(agg, AggregateManager) and agg.sources == (vmem, attrs)
    assert agg.get_min_granularity(mr) == PAGE
    views = [PageView(), PageView()]
    agg.register_listener(views[0], MemoryRegionSection(mr, 0, SIZE, ADDR))
    agg.register_listener(views[1], MemoryRegionSection(mr, 3 * MiB, 6 * MiB, ADDR + 3 * MiB))
    plugged: set[int] = set()
    shared: set[int] = set()
    per_block = BS // PAGE
    try:
        for kind, a, b in steps:
            if kind in ("plug", "unplug"):
                nb = min(b, BLOCKS - a)
                pages = set(range(a * per_block, (a + nb) * per_block))
                if kind == "plug":
                    resp = vmem.plug(ADDR + a * BS, nb)
                    assert (resp == ResponseType.ACK) == (not pages & plugged)
                    plugged |= pages if resp == ResponseType.ACK else set()
                else:
                    resp = vmem.unplug(ADDR + a * BS, nb)
                    assert (resp == ResponseType.ACK) == (pages <= plugged)
                    plugged -= pages if resp == ResponseType.ACK else set()
            elif kind == "unplug_all":
                assert vmem.unplug_all() == ResponseType.ACK
                plugged = set()
            else:
                count = min(b, PAGES - a)
                pages = set(range(a, a + count))
                if kind == "refuse":
                    views[0].refuse = True
                    try:
                        attrs.convert(a * PAGE, count * PAGE, to_private=False)
                    except OSError:
                        assert (pages - shared) & plugged
                    else:
                        assert not (pages - shared) & plugged
                        shared |= pages
                    views[0].refuse = False
                else:
                    attrs.convert(a * PAGE, count * PAGE, to_private=kind == "private")
                    shared = shared - pages if kind == "private" else shared | pages
            aggregate = plugged & shared
            for view in views:
                assert view.section is not None
                sec = view.section
                assert view.view == aggregate & set(range(sec.offset_within_region // PAGE, sec.end // PAGE))
            assert vmem.plugged_size == len(plugged) * PAGE
            assert attrs.shared_size == len(shared) * PAGE
    finally:
        for view in views:
            agg.unregister_listener(view)
    attrs.close()
    assert mr.ram_discard_manager is vmem and vmem.sink is None
    vmem.requested_size = 0
    vmem.unplug_all()
    vmem.unrealize()
    assert mr.ram_discard_manager is None
    assert policy.snapshot().coordinated_require == 0


@settings(max_examples=30, deadline=None)
@given(st.lists(step, max_size=20))
def test_virtio_mem_and_attributes_model(steps: list[tuple[str, int, int]]) -> None:
    scenario(steps, use_kvm=False)


@pytest.mark.parametrize(
    "steps",
    [
        [
            ("share", 0, PAGES),
            ("plug", 1, 2),
            ("private", 600, 300),
            ("refuse", 600, 100),
            ("unplug", 1, 1),
            ("plug", 0, 1),
            ("unplug_all", 0, 0),
            ("plug", 2, 3),
        ]
    ],
)
@needs_guest_memfd
def test_virtio_mem_and_attributes_real_guest_memfd(steps: list[tuple[str, int, int]]) -> None:
    scenario(steps, use_kvm=True)
