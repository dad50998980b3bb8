"""The block mapper as a machine consumer (``type = "blockdma"`` in a scenario file).

The machine's consumers are attached to its address space and report a status dict; this
one follows RAM blocks instead, so ``attach`` ignores the address space it is given.
Its scenario keys (QEMU-style spelling; read by :mod:`ramdiscard.machine.scenario.consumers`)::

    [[consumers]]
    type = "blockdma"
    id = "nvme0"                    # optional
    backend = "auto"                # auto | io_uring | mlock | null
    coordinate-discards = true      # false: pin every block whole, take disable-all (nvme:// today)
    iova-base = "0x100000000"       # start of the private IOVA window (default 4 GiB)
    iova-size = "0xffff00000000"    # its size (default 2**48 - 4 GiB)
    iova-align = "2M"               # alignment (and rounding) of each block's IOVA range
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from ramdiscard.consumers.blockdma.mapper import (
    DEFAULT_IOVA_ALIGN,
    DEFAULT_IOVA_BASE,
    DEFAULT_IOVA_SIZE,
    RamBlockDmaMapper,
)
from ramdiscard.consumers.dma import BACKENDS, DmaBackend, make_backend
from ramdiscard.errors import InvalidArgument

if TYPE_CHECKING:
    from ramdiscard.memory.address_space import AddressSpace
    from ramdiscard.ramblocks.registry import RamBlockRegistry
    from ramdiscard.rdm.policy import DiscardPolicy


class BlockDmaConsumer:
    """A :class:`RamBlockDmaMapper` with its own backend, shaped like the machine's consumers
    (``id``, ``kind``, ``attach(space)``, ``close()``, ``status()``).

    ``attach`` creates the mapper (its errors propagate, nothing held); ``close`` unpins,
    closes the backend and never raises; both are idempotent.
    """

    kind = "blockdma"

    def __init__(
        self,
        id: str,
        *,
        backend: str = "auto",
        coordinate_discards: bool = True,
        policy: DiscardPolicy | None = None,
        registry: RamBlockRegistry | None = None,
        iova_base: int = DEFAULT_IOVA_BASE,
        iova_size: int = DEFAULT_IOVA_SIZE,
        iova_align: int = DEFAULT_IOVA_ALIGN,
    ) -> None:
        if backend not in BACKENDS:
            raise InvalidArgument(f"unknown DMA backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        self.id = id
        self.backend_kind = backend
        self.coordinate_discards = coordinate_discards
        self._policy = policy
        self._registry = registry
        self._iova = (iova_base, iova_size, iova_align)
        self.mapper: RamBlockDmaMapper | None = None
        self._backend: DmaBackend | None = None

    def attach(self, space: AddressSpace | None = None) -> None:
        """Start mapping every RAM block; ``space`` is unused (blocks, not an address space)."""
        if self.mapper is not None:
            return
        backend = make_backend(self.backend_kind)
        base, size, align = self._iova
        try:
            self.mapper = RamBlockDmaMapper(
                backend,
                coordinate_discards=self.coordinate_discards,
                policy=self._policy,
                registry=self._registry,
                iova_base=base,
                iova_size=size,
                iova_align=align,
            )
        except BaseException:
            backend.close()
            raise
        self._backend = backend

    def close(self) -> None:
        mapper, self.mapper = self.mapper, None
        backend, self._backend = self._backend, None
        if mapper is not None:
            with contextlib.suppress(Exception):
                mapper.close()
        if backend is not None:
            backend.close()

    @property
    def pinned_bytes(self) -> int:
        """Bytes the mapper holds pinned now (0 before attach / after close)."""
        mapper = self.mapper
        return mapper.pinned_bytes if mapper is not None else 0

    def stale_pinned_bytes(self) -> int:
        """Pinned bytes of whole-pinned blocks that are no longer resident (see
        :meth:`RamBlockDmaMapper.stale_pinned_bytes`)."""
        mapper = self.mapper
        return mapper.stale_pinned_bytes() if mapper is not None else 0

    def status(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "type": self.kind, "backend": self.backend_kind}
        mapper = self.mapper
        if mapper is not None:
            blocks = mapper.blocks()
            out["pinned_bytes"] = mapper.pinned_bytes
            out["stale_pinned_bytes"] = mapper.stale_pinned_bytes()
            out["blocks"] = len(blocks)
            out["modes"] = {b.name: b.mode.value for b in blocks}
            out["failed"] = [b.name for b in blocks if b.error is not None]
        return out


def make_consumer(id: str, **options: object) -> BlockDmaConsumer:
    """Factory for the machine: ``make_consumer("nvme0", backend="null", coordinate_discards=True,
    iova_base=..., iova_size=..., iova_align=..., policy=..., registry=...)``."""
    return BlockDmaConsumer(id, **options)  # type: ignore[arg-type]
