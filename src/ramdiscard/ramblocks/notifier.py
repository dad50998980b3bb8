"""RamBlockNotifier: what a consumer of the RAM block list implements.

Contract (QEMU's ``RAMBlockNotifier`` plus three events this model adds):

* ``ram_block_added(block)``: a block joined the registry (or is replayed to a notifier
  that registers). It precedes every other event of that block.
* ``ram_block_mapped(block)`` / ``ram_block_unmapped(block)``: the block's region appeared
  in / vanished from the union of all live flat views. Mapped and unmapped alternate,
  starting with mapped. A region's RamDiscardManager cannot change while it is mapped,
  so ``mapped`` is the moment a consumer can rely on the manager it sees.
* ``ram_block_manager_changed(block)``: the region's manager was set or cleared (always
  while unmapped); ``block.ram_discard_manager`` is the new one. It arrives before the
  provider does anything else to the memory (virtio-mem discards the whole block right
  after becoming the manager).
* ``ram_block_resized(block, old_size, new_size)``: the used length changed (a shrink has
  already discarded the tail).
* ``ram_block_removed(block)``: the block left the registry (or the notifier is being
  unregistered). An unmapped event precedes it if the block was mapped.

Only the replay inside :meth:`~ramdiscard.ramblocks.RamBlockRegistry.add_notifier` may
raise (the registration is then rolled back). Every other event must not raise: memory
changes cannot be refused by a RAM block consumer, and an exception is logged and
otherwise ignored. Events arrive with the topology lock (the model's BQL) held.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ramdiscard.ramblocks.block import LiveBlock


class RamBlockNotifier:
    """Subclass and override the events of interest; every default does nothing."""

    def ram_block_added(self, block: LiveBlock) -> None:
        """A block exists. May raise only during replay at registration."""

    def ram_block_removed(self, block: LiveBlock) -> None:
        """A block is gone (or this notifier is being unregistered)."""

    def ram_block_resized(self, block: LiveBlock, old_size: int, new_size: int) -> None:
        """The block's used length changed from ``old_size`` to ``new_size``."""

    def ram_block_mapped(self, block: LiveBlock) -> None:
        """The block's region appeared in some flat view. May raise only during replay."""

    def ram_block_unmapped(self, block: LiveBlock) -> None:
        """The block's region vanished from every flat view."""

    def ram_block_manager_changed(self, block: LiveBlock) -> None:
        """The block's region got or lost its RamDiscardManager."""
