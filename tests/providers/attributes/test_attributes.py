"""RamBlockAttributes in the plain model: validation, notifications, rollback, policy, joining."""

from __future__ import annotations

import pytest

from ramdiscard import RamBlockAttributes
from ramdiscard.errors import DiscardPolicyError, InvalidArgument, ManagerBusy
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.rdm import AggregateManager, BlockStateManager, DiscardPolicy
from ramdiscard.units import MiB
from tests.providers.attributes.attr_helpers import PAGE, PageView, ram_region

SIZE = 4 * MiB


def model(size: int = SIZE, policy: DiscardPolicy | None = None) -> RamBlockAttributes:
    return RamBlockAttributes(ram_region(size), use_kvm=False, policy=policy or DiscardPolicy())


def whole(attrs: RamBlockAttributes) -> MemoryRegionSection:
    return MemoryRegionSection(attrs.region, 0, attrs.region.size)


def test_creation_all_private_page_granularity_and_policy() -> None:
    policy = DiscardPolicy()
    attrs = model(policy=policy)
    assert attrs.region.ram_discard_manager is attrs
    assert attrs.get_min_granularity(attrs.region) == PAGE
    assert attrs.private_size == SIZE and attrs.shared_size == 0
    assert policy.snapshot().coordinated_require == 1
    assert "model only" in attrs.backend_description and attrs.guest_memfd is None
    attrs.close()
    attrs.close()
    assert policy.snapshot().coordinated_require == 0
    assert attrs.region.ram_discard_manager is None


def test_creation_refused_when_discard_disabled() -> None:
    policy = DiscardPolicy()
    policy.disable()
    mr = ram_region(SIZE)
    with pytest.raises(DiscardPolicyError):
        RamBlockAttributes(mr, use_kvm=False, policy=policy)
    assert mr.ram_discard_manager is None and policy.snapshot().coordinated_require == 0


@pytest.mark.parametrize(
    ("offset", "size"),
    [(1, PAGE), (0, PAGE + 1), (0, 0), (-PAGE, PAGE), (SIZE - PAGE, 2 * PAGE), (SIZE, PAGE)],
)
def test_state_change_invalid(offset: int, size: int) -> None:
    attrs = model()
    view = PageView()
    attrs.register_listener(view, whole(attrs))
    for to_private in (False, True):
        with pytest.raises(InvalidArgument):
            attrs.state_change(offset, size, to_private)
    assert attrs.shared_size == 0 and view.calls == []


def test_state_change_notifies_shared_populate_and_private_discard() -> None:
    attrs = model()
    view = PageView()
    attrs.register_listener(view, whole(attrs))
    attrs.state_change(0, 4 * PAGE, to_private=False)
    assert view.calls == [("populate", 0, 4 * PAGE)]
    attrs.state_change(0, 4 * PAGE, to_private=False)  # already shared: nothing
    attrs.state_change(2 * PAGE, 4 * PAGE, to_private=False)  # mixed: only the private part
    assert view.calls[-1] == ("populate", 4 * PAGE, 2 * PAGE)
    attrs.state_change(PAGE, 2 * PAGE, to_private=True)
    assert view.calls[-1] == ("discard", PAGE, 2 * PAGE)
    attrs.state_change(8 * PAGE, PAGE, to_private=True)  # already private: nothing
    assert len(view.calls) == 3
    assert view.view == {0, 3, 4, 5}
    assert attrs.is_private(PAGE, 2 * PAGE) and not attrs.is_private(0, 2 * PAGE)


def test_populate_refusal_rolls_back_everything() -> None:
    attrs = model()
    first = PageView()
    refusing = PageView(refuse=True)
    attrs.register_listener(refusing, whole(attrs))
    attrs.register_listener(first, whole(attrs))
    with pytest.raises(OSError):
        attrs.state_change(0, 8 * PAGE, to_private=False)
    assert first.view == set() and first.calls == [("populate", 0, 8 * PAGE), ("discard", 0, 8 * PAGE)]
    assert attrs.shared_size == 0 and attrs.bitmap_bytes() == bytes(len(attrs.bitmap_bytes()))


def test_is_populated_qemu_semantics() -> None:
    attrs = model()
    mr = attrs.region
    assert attrs.is_populated(MemoryRegionSection(mr, 0, 0))
    assert attrs.is_populated(MemoryRegionSection(mr, 100, PAGE - 1))
    assert not attrs.is_populated(MemoryRegionSection(mr, 0, PAGE))
    attrs.state_change(0, PAGE, to_private=False)
    assert attrs.is_populated(MemoryRegionSection(mr, 0, PAGE))
    assert attrs.is_populated(MemoryRegionSection(mr, 0x800, PAGE))  # no widening, as QEMU


def test_joins_an_existing_manager_as_a_source() -> None:
    mr = ram_region(SIZE)
    plug = BlockStateManager(mr, 2 * MiB)
    mr.set_ram_discard_manager(plug)
    attrs = RamBlockAttributes(mr, use_kvm=False, policy=DiscardPolicy())
    agg = mr.ram_discard_manager
    assert isinstance(agg, AggregateManager) and agg.sources == (plug, attrs)
    assert agg.get_min_granularity(mr) == PAGE
    view = PageView()
    agg.register_listener(view, MemoryRegionSection(mr, 0, SIZE))
    attrs.convert(0, 8 * PAGE, to_private=False)
    assert view.view == set()
    plug.set_populated(0, 2 * MiB)
    assert view.view == set(range(8))
    agg.unregister_listener(view)
    attrs.close()
    assert mr.ram_discard_manager is plug and plug.sink is None


def test_second_manager_set_directly_is_busy() -> None:
    attrs = model()
    with pytest.raises(ManagerBusy):
        attrs.region.set_ram_discard_manager(BlockStateManager(attrs.region, PAGE))


def test_convert_discards_shared_backing_in_model() -> None:
    attrs = model()
    ram = attrs.region.ram
    attrs.convert(0, SIZE, to_private=False)
    ram.populate(0, SIZE)  # type: ignore[union-attr]
    assert attrs.shared_resident_bytes() == SIZE
    attrs.convert(0, SIZE // 2, to_private=True)
    assert attrs.shared_resident_bytes() == SIZE // 2
    with pytest.raises(InvalidArgument):
        attrs.convert_gpa(0, PAGE, to_private=True)
    with pytest.raises(InvalidArgument):
        attrs.populate_private(0, PAGE)
