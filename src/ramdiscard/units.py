"""Sizes in bytes: parsing "2M"/"4G" style strings and formatting them back.

Suffixes are binary (K = 1024), as in QEMU's size properties. A bare number is bytes.
"""

from __future__ import annotations

import re

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIXES = {"": 1, "b": 1, "k": KiB, "m": MiB, "g": GiB, "t": TiB, "p": 1 << 50, "e": 1 << 60}
_SIZE_RE = re.compile(r"^\s*(0x[0-9a-f]+|\d+(?:\.\d+)?)\s*([kmgtpe]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse ``"2M"``, ``"4G"``, ``"1.5G"``, ``"0x1000"`` or an int into bytes.

    Raises ValueError for anything that is not a non-negative whole number of bytes.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"invalid size {text}: negative")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix")
    number: str = m.group(1)
    suffix: str = m.group(2).lower()
    if number.lower().startswith("0x"):
        if suffix:
            raise ValueError(f"invalid size {text!r}: hex values take no suffix")
        return int(number, 16)
    mult = _SUFFIXES[suffix]
    if "." in number:
        whole, frac = number.split(".")
        numerator = int(whole + frac) * mult
        denominator: int = 10 ** len(frac)
        if numerator % denominator:
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
        return numerator // denominator
    return int(number) * mult


def format_size(size: int) -> str:
    """Format bytes the way QEMU prints sizes: the largest binary unit that divides exactly,
    or a one-decimal approximation when none does ("1.5 GiB")."""
    if size < 0:
        return "-" + format_size(-size)
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if size >= unit:
            if size % unit == 0:
                return f"{size // unit} {name}"
            return f"{size / unit:.1f} {name}"
    return f"{size} B"


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def align_down(value: int, alignment: int) -> int:
    return value - value % alignment


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
