"""Guest side: a model of the Linux virtio-mem driver and a workload using plugged memory."""

from ramdiscard.guest.codec import Config, Exchange, ReqType, RespType
from ramdiscard.guest.driver import MEMORY_BLOCK_SIZE, Device, DriverState, GuestDriver, Workload
from ramdiscard.guest.workload import GuestMemory, TouchWorkload

__all__ = [
    "MEMORY_BLOCK_SIZE",
    "Config",
    "Device",
    "DriverState",
    "Exchange",
    "GuestDriver",
    "GuestMemory",
    "ReqType",
    "RespType",
    "TouchWorkload",
    "Workload",
]
