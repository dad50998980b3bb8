"""RamBlockAttributes over a real guest_memfd in a real KVM VM.

Measures: the guest_memfd's allocation (system ``Unevictable``, where guest_memfd folios are
accounted; fstat st_blocks stays 0 for guest_memfd) rising on private allocation and falling
on the punch done by conversion to shared; and the shared side's resident bytes (mincore)
returned to the host on conversion to private.
"""

from __future__ import annotations

import errno

import pytest

from ramdiscard import RamBlockAttributes
from ramdiscard.errors import HostMemoryError
from ramdiscard.faults import Op, counting, inject
from ramdiscard.memory import MemoryRegionSection
from ramdiscard.providers.attributes import GmemUnavailable, open_guest_memfd_vm, unevictable_bytes
from ramdiscard.rdm import DiscardPolicy
from ramdiscard.units import MiB
from tests.providers.attributes.attr_helpers import PAGE, PageView, ram_region

SIZE = 32 * MiB
HALF = SIZE // 2


def _kvm_reason() -> str | None:
    try:
        open_guest_memfd_vm().close()
    except GmemUnavailable as exc:
        return str(exc)
    return None


_REASON = _kvm_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no guest_memfd on this host: {_REASON}")


def near(delta: int, expected: int) -> bool:
    """Within 10 % (other processes share the system-wide counter)."""
    return abs(delta - expected) <= expected // 10


def test_real_backend_and_memslot() -> None:
    policy = DiscardPolicy()
    attrs = RamBlockAttributes(ram_region(SIZE), policy=policy)
    try:
        desc = attrs.backend_description
        assert attrs.guest_memfd is not None and "guest_memfd" in desc
        assert "KVM_X86_" in desc and "memslot 0" in desc
        assert attrs.memslot == (0, 0)
        assert attrs.kvm_attributes == ("attributes set" in desc)
    finally:
        attrs.close()
    assert attrs.guest_memfd is None and policy.snapshot().coordinated_require == 0


def test_punch_on_shared_and_discard_on_private_free_host_memory() -> None:
    attrs = RamBlockAttributes(ram_region(SIZE), policy=DiscardPolicy())
    ram = attrs.region.ram
    view = PageView()
    attrs.register_listener(view, MemoryRegionSection(attrs.region, 0, SIZE))
    try:
        base = unevictable_bytes()
        attrs.populate_private(0, SIZE)
        allocated = unevictable_bytes() - base
        assert near(allocated, SIZE), allocated

        attrs.convert(0, HALF, to_private=False)
        assert view.view == set(range(HALF // PAGE))
        punched = allocated - (unevictable_bytes() - base)
        assert near(punched, HALF), punched

        ram.populate(0, HALF)  # type: ignore[union-attr]
        assert attrs.shared_resident_bytes() == HALF
        attrs.convert(0, HALF, to_private=True, prealloc_private=True)
        assert attrs.shared_resident_bytes() == 0 and view.view == set()
        assert near(unevictable_bytes() - base, SIZE)
    finally:
        attrs.unregister_listener(view)
        before_close = unevictable_bytes()
        attrs.close()
    assert near(before_close - unevictable_bytes(), SIZE)


def test_external_vm_slot_and_gpa_conversion() -> None:
    vm = open_guest_memfd_vm()
    try:
        attrs = RamBlockAttributes(ram_region(SIZE), kvm_vm=vm, slot=3, gpa=1 << 32, policy=DiscardPolicy())
        assert attrs.memslot == (3, 1 << 32)
        attrs.convert_gpa((1 << 32) + PAGE, PAGE, to_private=False)
        assert attrs.shared_size == PAGE and not attrs.is_private(PAGE, PAGE)
        attrs.close()
        # The slot is free again: a new object can take it.
        again = RamBlockAttributes(ram_region(SIZE), kvm_vm=vm, slot=3, gpa=1 << 32, policy=DiscardPolicy())
        again.close()
    finally:
        vm.close()


def test_refused_conversion_changes_nothing_real() -> None:
    attrs = RamBlockAttributes(ram_region(SIZE), policy=DiscardPolicy())
    try:
        attrs.populate_private(0, 4 * PAGE)
        refusing = PageView(refuse=True)
        attrs.register_listener(refusing, MemoryRegionSection(attrs.region, 0, SIZE))
        base = unevictable_bytes()
        with pytest.raises(OSError, match="refused"):
            attrs.convert(0, 4 * PAGE, to_private=False)
        assert attrs.is_private(0, 4 * PAGE) and unevictable_bytes() - base > -4 * PAGE
        attrs.unregister_listener(refusing)
    finally:
        attrs.close()


def test_injected_faults() -> None:
    policy = DiscardPolicy()
    mr = ram_region(SIZE)
    with counting() as log:
        RamBlockAttributes(mr, policy=policy).close()
    calls = log.counts[Op.KVM_IOCTL]
    assert calls >= 4
    for nth in range(1, calls + 1):
        # A fault inside the probe looks like "no guest_memfd": model-only fallback.
        # Anywhere else creation fails and leaves nothing behind.
        with inject(Op.KVM_IOCTL, nth=nth, errno=errno.EIO):
            try:
                attrs = RamBlockAttributes(mr, policy=policy)
            except HostMemoryError:
                assert mr.ram_discard_manager is None
                assert policy.snapshot().coordinated_require == 0
                continue
        assert ("model only" in attrs.backend_description) == (attrs.guest_memfd is None)
        attrs.close()
        assert policy.snapshot().coordinated_require == 0

    attrs = RamBlockAttributes(mr, policy=policy)
    try:
        with inject(Op.DISCARD, errno=errno.EIO), pytest.raises(HostMemoryError):
            attrs.convert(0, PAGE, to_private=False)
        assert attrs.shared_size == PAGE  # state converted, only the punch failed
    finally:
        attrs.close()
