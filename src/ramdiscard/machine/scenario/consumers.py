"""The ``[[consumers]]`` table: who maps or pins the guest's memory.

Rules:

* ``type`` (vfio, kvm, blockdma) is required and decides which other keys are valid:
  vfio: ``backend``, ``coordinate-discards``, ``dma-limit``, ``dma-limit-check``;
  blockdma: ``backend``, ``coordinate-discards``, ``iova-base``, ``iova-size``,
  ``iova-align``; kvm: ``mode``. Every type takes ``id`` (default ``<type><index>``).
* ``iova-align`` is a power of two >= 4K, ``iova-base`` a multiple of it, and the IOVA
  window ends inside 64 bits.
* Consumer ids are unique.
"""

from __future__ import annotations

from ramdiscard.machine.scenario.fields import Reader, show
from ramdiscard.machine.scenario.model import ConsumerSpec, ConsumerType, DmaBackendKind, KvmMode
from ramdiscard.units import is_power_of_2

KEYS: dict[ConsumerType, tuple[str, ...]] = {
    ConsumerType.VFIO: ("type", "id", "backend", "coordinate-discards", "dma-limit", "dma-limit-check"),
    ConsumerType.BLOCKDMA: (
        "type", "id", "backend", "coordinate-discards", "iova-base", "iova-size", "iova-align",
    ),
    ConsumerType.KVM: ("type", "id", "mode"),
}  # fmt: skip


def read_consumers(r: Reader, value: object) -> tuple[ConsumerSpec, ...]:
    """The ``consumers`` array (may be empty); see the module rules."""
    consumers: list[ConsumerSpec] = []
    for i, raw in enumerate(r.array(value, "consumers")):
        c = read_consumer(r, raw, f"consumers[{i}]", i)
        if any(o.id == c.id for o in consumers):
            raise r.fail(f"consumers[{i}].id", f"duplicate consumer id {show(c.id)}")
        consumers.append(c)
    return tuple(consumers)


def read_consumer(r: Reader, raw: object, key: str, index: int) -> ConsumerSpec:
    """One ``[[consumers]]`` entry at ``key`` (the ``index``-th)."""
    tbl = r.table(raw, key)
    if "type" not in tbl:
        raise r.fail(f"{key}.type", "missing (vfio, kvm or blockdma)")
    ctype = r.choice(tbl["type"], f"{key}.type", ConsumerType)
    r.keys(tbl, key, KEYS[ctype])
    cid = r.ident(tbl.get("id", f"{ctype.value}{index}"), f"{key}.id")
    iova_base = r.size(tbl.get("iova-base", 1 << 32), f"{key}.iova-base")
    iova_size = r.size(tbl.get("iova-size", (1 << 48) - (1 << 32)), f"{key}.iova-size", allow_zero=False)
    align_raw = tbl.get("iova-align", "2M")
    iova_align = r.size(align_raw, f"{key}.iova-align")
    if not is_power_of_2(iova_align) or iova_align < 4096:
        raise r.fail(f"{key}.iova-align", f"must be a power of two >= 4K, got {show(align_raw)}")
    if iova_base % iova_align:
        raise r.fail(f"{key}.iova-base", f"must be a multiple of iova-align, got {show(tbl['iova-base'])}")
    if iova_base + iova_size > 1 << 64:
        raise r.fail(f"{key}.iova-size", "the IOVA window ends beyond 64 bits")
    return ConsumerSpec(
        type=ctype,
        id=cid,
        backend=r.choice(tbl.get("backend", "auto"), f"{key}.backend", DmaBackendKind),
        coordinate_discards=r.boolean(tbl.get("coordinate-discards", True), f"{key}.coordinate-discards"),
        dma_limit=r.integer(tbl.get("dma-limit", 65535), f"{key}.dma-limit", 1, 1 << 32),
        dma_limit_check=r.boolean(tbl.get("dma-limit-check", True), f"{key}.dma-limit-check"),
        mode=r.choice(tbl.get("mode", "auto"), f"{key}.mode", KvmMode),
        iova_base=iova_base,
        iova_size=iova_size,
        iova_align=iova_align,
    )
