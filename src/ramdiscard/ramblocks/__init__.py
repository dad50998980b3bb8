"""RAM block notifiers: the list of live RAM blocks, and consumers told about it.

QEMU's ``ram_block_notifier_add`` lets a consumer that works on whole RAM blocks rather
than on an address space (``block/nvme.c`` through ``util/vfio-helpers.c``, Xen's map
cache) follow every RAMBlock. This package adds the two facts such a consumer needs to
honour a RamDiscardManager: when a block's region is mapped (its manager is then fixed)
and when its manager changes.

* :class:`RamBlockRegistry` / :func:`default_registry`: the blocks and their notifiers.
* :class:`RamBlockNotifier`: the events, and their contract.
* :class:`LiveBlock`: what an event carries.
"""

from ramdiscard.ramblocks.block import LiveBlock
from ramdiscard.ramblocks.notifier import RamBlockNotifier
from ramdiscard.ramblocks.registry import BlockRegistered, RamBlockRegistry, default_registry, registry_of

__all__ = [
    "BlockRegistered",
    "LiveBlock",
    "RamBlockNotifier",
    "RamBlockRegistry",
    "default_registry",
    "registry_of",
]
