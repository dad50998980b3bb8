"""ramdiscard: QEMU's RamDiscardManager system in Python, on real host memory."""

from ramdiscard.units import GiB, KiB, MiB, TiB, format_size, parse_size

__all__ = ["GiB", "KiB", "MiB", "TiB", "format_size", "parse_size"]
__version__ = "0.1.0"
