"""A confidential VM with hot-pluggable memory: a 2 MiB-block plug provider (virtio-mem's
role; a plain BlockStateManager until the virtio-mem device lands) and RamBlockAttributes on
one region. After every plug, unplug or conversion each listener's view equals the
aggregate populated state (plugged and shared) inside its section."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ramdiscard import RamBlockAttributes
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.rdm import AggregateManager, BlockStateManager, DiscardPolicy, add_ram_discard_source
from ramdiscard.units import MiB
from tests.providers.attributes.attr_helpers import PAGE, PageView, needs_guest_memfd, ram_region

SIZE = 8 * MiB
BLOCK = 2 * MiB
PAGES = SIZE // PAGE

step = st.one_of(
    st.tuples(st.just("plug"), st.integers(0, SIZE // BLOCK - 1), st.booleans()),
    st.tuples(st.just("convert"), st.integers(0, PAGES - 1), st.integers(1, 700), st.booleans()),
    st.tuples(st.just("refuse"), st.integers(0, PAGES - 1), st.integers(1, 700)),
)


def run(steps: list[tuple[object, ...]], use_kvm: bool) -> None:
    mr = ram_region(SIZE)
    plug = BlockStateManager(mr, BLOCK)
    add_ram_discard_source(mr, plug)
    attrs = RamBlockAttributes(mr, use_kvm=use_kvm, policy=DiscardPolicy())
    assert (attrs.guest_memfd is not None) == use_kvm, attrs.backend_description
    agg = mr.ram_discard_manager
    assert isinstance(agg, AggregateManager)
    views = [PageView(), PageView()]
    agg.register_listener(views[0], MemoryRegionSection(mr, 0, SIZE))
    agg.register_listener(views[1], MemoryRegionSection(mr, BLOCK - 5 * PAGE, BLOCK, 0x4000_0000))
    plugged: set[int] = set()
    shared: set[int] = set()
    try:
        for s in steps:
            if s[0] == "plug":
                _, block, on = s
                assert isinstance(block, int)
                pages = set(range(block * BLOCK // PAGE, (block + 1) * BLOCK // PAGE))
                if on:
                    plug.set_populated(block * BLOCK, BLOCK)
                    plugged |= pages
                else:
                    plug.set_discarded(block * BLOCK, BLOCK)
                    plugged -= pages
            else:
                first, count = s[1], s[2]
                assert isinstance(first, int) and isinstance(count, int)
                count = min(count, PAGES - first)
                pages = set(range(first, first + count))
                if s[0] == "refuse":
                    views[0].refuse = True
                    try:
                        attrs.convert(first * PAGE, count * PAGE, to_private=False)
                    except OSError:
                        assert (pages - shared) & plugged
                    else:
                        assert not (pages - shared) & plugged
                        shared |= pages
                    views[0].refuse = False
                else:
                    to_private = bool(s[3])
                    attrs.convert(first * PAGE, count * PAGE, to_private=to_private)
                    shared = shared - pages if to_private else shared | pages
            aggregate = plugged & shared
            for view in views:
                assert view.section is not None
                sec = view.section
                assert view.view == aggregate & set(range(sec.offset_within_region // PAGE, sec.end // PAGE))
            assert attrs.shared_size == len(shared) * PAGE and plug.populated_size == len(plugged) * PAGE
    finally:
        for view in views:
            agg.unregister_listener(view)
        attrs.close()


@settings(max_examples=40, deadline=None)
@given(st.lists(step, max_size=25))
def test_plug_and_convert_model(steps: list[tuple[object, ...]]) -> None:
    run(steps, use_kvm=False)


@needs_guest_memfd
def test_plug_and_convert_real_guest_memfd() -> None:
    run(
        [
            ("convert", 0, PAGES, False),
            ("plug", 1, True),
            ("convert", 600, 100, True),
            ("refuse", 600, 50),
            ("plug", 0, True),
            ("plug", 1, False),
            ("convert", 0, 10, True),
            ("plug", 1, True),
        ],
        use_kvm=True,
    )
