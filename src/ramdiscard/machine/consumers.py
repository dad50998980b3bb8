"""The machine's consumers: a scenario's ``[[consumers]]`` entries bound to the project's
one implementation of each consumer.

Rules:

* A consumer has ``id``, ``kind``, ``attach(space)``, ``close()`` (idempotent, never
  raises, releases every pin, mapping and memslot), ``pinned_bytes``,
  ``stale_pinned_bytes()`` and ``status()`` (:class:`Consumer`).
* ``vfio`` is :class:`VfioConsumer`: a :class:`~ramdiscard.consumers.vfio.VfioContainer` over a DMA
  backend the consumer owns (closed at close). All mapping, pinning, DMA-limit and policy
  behaviour is the container's; this class only adds the id, owns the backend and reports.
* ``kvm`` is :class:`KvmConsumer`: :class:`~ramdiscard.consumers.kvm.KvmMemslots` over a real
  :class:`~ramdiscard.consumers.kvm.KvmVm` or, without ``/dev/kvm``, a
  :class:`~ramdiscard.consumers.kvm.ModelVm` (memslots counted, not created).
* ``blockdma`` is :class:`~ramdiscard.consumers.blockdma.BlockDmaConsumer`
  (:func:`ramdiscard.consumers.blockdma.make_consumer`), which already has this shape.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

from ramdiscard.consumers.dma import DmaBackend, stale_pinned_bytes
from ramdiscard.consumers.kvm import KvmMemslots
from ramdiscard.consumers.vfio import VfioContainer
from ramdiscard.memory.address_space import AddressSpace

log = logging.getLogger("ramdiscard.machine")


class Consumer(Protocol):
    """What the machine needs of a consumer; see the module rules."""

    id: str
    kind: str

    def attach(self, space: AddressSpace) -> None: ...

    def close(self) -> None: ...

    @property
    def pinned_bytes(self) -> int: ...

    def stale_pinned_bytes(self) -> int: ...

    def status(self) -> dict[str, object]: ...


class VfioConsumer:
    """``container`` (a VfioContainer over ``backend``) under the scenario id ``id``.

    Takes ownership of ``backend``: :meth:`close` detaches the container, unmaps
    everything and closes the backend.
    """

    kind = "vfio"

    def __init__(self, id: str, backend: DmaBackend, container: VfioContainer) -> None:
        self.id = id
        self.backend = backend
        self.container = container

    def attach(self, space: AddressSpace) -> None:
        self.container.attach(space)

    def close(self) -> None:
        try:
            self.container.close()
        except Exception:  # teardown must go on; the error is logged
            log.exception("%s: closing the container failed", self.id)
        with contextlib.suppress(Exception):
            self.backend.close()

    @property
    def pinned_bytes(self) -> int:
        return self.backend.pinned_bytes

    def stale_pinned_bytes(self) -> int:
        """Bytes of whole-mapped sections that are no longer resident: memory the guest gave
        back (discarded) that the pin still holds. Granule mappings of managed sections are
        unmapped before the discard, so they never count."""
        return sum(
            stale_pinned_bytes(self.backend, p.section.mr.ram, p.section.offset_within_region, p.section.size)
            for p in self.container.plain_sections()
        )

    def status(self) -> dict[str, object]:
        c = self.container
        return {
            "id": self.id,
            "type": self.kind,
            "backend": type(self.backend).__name__,
            "coordinate_discards": c.coordinate_discards,
            "dma_mappings": c.mapping_count,
            "peak_dma_mappings": c.peak_mapping_count,
            "dma_limit": c.max_mappings,
            "dma_limit_check": c.dma_limit_check,
            "worst_case_mappings": c.worst_case_mappings(),
            "pinned_bytes": self.backend.pinned_bytes,
            "stale_pinned_bytes": self.stale_pinned_bytes(),
            "peak_pinned_bytes": c.peak_mapped_bytes,
            "refused_maps": c.refused_maps,
        }


class KvmConsumer:
    """``memslots`` (KvmMemslots, which owns its VM) under the scenario id ``id``."""

    kind = "kvm"

    def __init__(self, id: str, memslots: KvmMemslots, *, real_kvm: bool) -> None:
        self.id = id
        self.memslots = memslots
        self.real_kvm = real_kvm

    def attach(self, space: AddressSpace) -> None:
        self.memslots.attach(space)

    def close(self) -> None:
        try:
            self.memslots.close()
        except Exception:
            log.exception("%s: closing the memslots failed", self.id)
        finally:
            with contextlib.suppress(Exception):
                self.memslots.vm.close()

    @property
    def pinned_bytes(self) -> int:
        return 0

    def stale_pinned_bytes(self) -> int:
        return 0

    def status(self) -> dict[str, object]:
        m = self.memslots
        return {
            "id": self.id,
            "type": self.kind,
            "real_kvm": self.real_kvm,
            "memslots": m.slot_count,
            "peak_memslots": m.peak_slots,
            "memslots_created": m.created,
            "memslots_deleted": m.deleted,
            "nr_memslots": m.nr_memslots,
        }
