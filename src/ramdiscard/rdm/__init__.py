"""The RamDiscardManager contract: managers, listeners, the block-state provider, policy."""

from ramdiscard.rdm.bitmap import Bitmap
from ramdiscard.rdm.block_state import BlockStateManager
from ramdiscard.rdm.listener import RamDiscardListener
from ramdiscard.rdm.manager import RamDiscardManager, ReplayFn
from ramdiscard.rdm.policy import DiscardCount, DiscardPolicy, PolicySnapshot, default_policy

__all__ = [
    "Bitmap",
    "BlockStateManager",
    "DiscardCount",
    "DiscardPolicy",
    "PolicySnapshot",
    "RamDiscardListener",
    "RamDiscardManager",
    "ReplayFn",
    "default_policy",
]
