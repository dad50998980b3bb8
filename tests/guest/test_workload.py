from __future__ import annotations

import pytest

from ramdiscard.guest import TouchWorkload
from ramdiscard.units import MiB


class Mem:
    def __init__(self) -> None:
        self.data: dict[int, int] = {}
        self.fills: list[tuple[int, int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        raise AssertionError("fill is used")

    def fill(self, gpa: int, size: int, byte: int) -> None:
        self.fills.append((gpa, size, byte))
        self.data[gpa] = byte
        self.data[gpa + size - 1] = byte

    def read(self, gpa: int, length: int) -> bytes:
        return bytes([self.data.get(gpa, 0)])


@pytest.mark.parametrize("touch", [0.0, 0.25, 0.5, 1.0])
def test_touch_fraction(touch: float) -> None:
    mem = Mem()
    w = TouchWorkload(mem, touch=touch)
    w.plugged(0, 256 * MiB)
    assert w.touched_bytes == int(256 * MiB * touch)
    assert w.verify() == []
    w.unplugging(128 * MiB, 128 * MiB)
    assert w.touched_bytes == int(128 * MiB * touch)
    w.unplugged_all()
    assert w.touched_bytes == 0


def test_bad_touch() -> None:
    with pytest.raises(ValueError):
        TouchWorkload(Mem(), touch=1.5)
