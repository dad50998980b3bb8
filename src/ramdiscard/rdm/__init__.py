"""The RamDiscardManager contract: managers, listeners, the block-state provider, policy."""

from ramdiscard.rdm.aggregate import (
    AggregateManager,
    RamDiscardSource,
    SourceNotFound,
    add_ram_discard_source,
    remove_ram_discard_source,
)
from ramdiscard.rdm.bitmap import Bitmap
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.rdm.manager import NotificationSink, RamDiscardManager, ReplayFn, manager_of, region_lock
from ramdiscard.rdm.notify import DiscardNotificationError, Notifier
from ramdiscard.rdm.policy import DiscardCount, DiscardPolicy, PolicySnapshot, default_policy, policy_of

__all__ = [
    "AggregateManager",
    "Bitmap",
    "BlockStateManager",
    "DiscardCount",
    "DiscardNotificationError",
    "DiscardPolicy",
    "NotificationSink",
    "Notifier",
    "PolicySnapshot",
    "RamDiscardListener",
    "RamDiscardManager",
    "RamDiscardSource",
    "ReplayFn",
    "SourceNotFound",
    "add_ram_discard_source",
    "default_policy",
    "manager_of",
    "policy_of",
    "region_lock",
    "remove_ram_discard_source",
]
