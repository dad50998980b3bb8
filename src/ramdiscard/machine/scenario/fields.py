"""Reading one value of a scenario file: types, units and the one-line error naming the key.

Rules:

* Every reader method returns the checked value or raises :class:`ScenarioError` with
  ``"<source>: <key>: <message>"`` on one line; a key made of anything but ASCII letters,
  digits and ``_.[]-`` is escaped so the line stays one line and unambiguous.
* Sizes are strings with binary suffixes ("2M", "4G") or integers (bytes); addresses may
  also be hex strings ("0x100000000"); both are below 2**64.
* Values are shown as written (:func:`show`): strings quoted and cut at 64 characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from ramdiscard.machine.scenario.model import ScenarioError
from ramdiscard.units import GiB, KiB, MiB, parse_size

_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")


def show(value: object) -> str:
    """``value`` as the file wrote it, for an error message."""
    if isinstance(value, str):
        return json.dumps(value[:64] + ("..." if len(value) > 64 else ""), ensure_ascii=True)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def short_size(n: int) -> str:
    """``n`` bytes in the file's own notation: "2M", "1G", "4K" (exact), else bytes."""
    for unit, suffix in ((GiB, "G"), (MiB, "M"), (KiB, "K")):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


class Reader:
    """Checks values of the scenario read from ``source``; see the module rules."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, message: str) -> ScenarioError:
        """The error for ``key`` (to be raised by the caller)."""
        safe = "".join(
            c if c.isascii() and (c.isalnum() or c in "_.[]-") else f"\\u{ord(c):04x}" for c in key
        )
        safe = safe.replace("..", '."".').rstrip(".") if safe.strip(".") else '""'
        return ScenarioError(f"{self.source}: {safe}: {message}")

    def table(self, value: object, key: str) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {show(value)}")
        return value

    def keys(self, tbl: Mapping[str, Any], prefix: str, allowed: tuple[str, ...]) -> None:
        """Refuse any key of ``tbl`` not in ``allowed`` (a typo must not fall back to a default)."""
        for k in tbl:
            if k not in allowed:
                where = f"{prefix}.{k}" if prefix else k
                raise self.fail(where, f"unknown key (expected one of: {', '.join(allowed)})")

    def size(self, value: object, key: str, *, allow_zero: bool = True) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise self.fail(key, f'must be a size like "2M" or "4G", got {show(value)}')
        try:
            n = parse_size(value)
        except ValueError:
            raise self.fail(key, f'must be a size like "2M" or "4G", got {show(value)}') from None
        if n == 0 and not allow_zero:
            raise self.fail(key, f"must be positive, got {show(value)}")
        if n >= 1 << 64:
            raise self.fail(key, f"too large, got {show(value)}")
        return n

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, got {show(value)}")
        return value

    def integer(self, value: object, key: str, lo: int, hi: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.fail(key, f"must be an integer in [{lo}, {hi}], got {show(value)}")
        return value

    def string(self, value: object, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(key, f"must be a string, got {show(value)}")
        return value

    def path(self, value: object, key: str) -> str:
        """A non-empty string."""
        s = self.string(value, key)
        if not s:
            raise self.fail(key, "must not be empty")
        return s

    def ident(self, value: object, key: str) -> str:
        s = self.string(value, key)
        if not _ID_RE.match(s):
            raise self.fail(key, f"must be an identifier (letter, then letters/digits/_.-), got {show(s)}")
        return s

    def choice(self, value: object, key: str, enum: type[StrEnum]) -> Any:
        choices = ", ".join(e.value for e in enum)
        if not isinstance(value, str):
            raise self.fail(key, f"must be one of {choices}, got {show(value)}")
        try:
            return enum(value)
        except ValueError:
            raise self.fail(key, f"must be one of {choices}, got {show(value)}") from None

    def array(self, value: object, key: str) -> list[Any]:
        if not isinstance(value, list):
            raise self.fail(key, f"must be an array of tables ([[{key}]]), got {show(value)}")
        return value
