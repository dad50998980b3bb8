import pytest
from hypothesis import given
from hypothesis import strategies as st

from ramdiscard import GiB, KiB, MiB, format_size, parse_size


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("2M", 2 * MiB),
        ("4G", 4 * GiB),
        ("4096", 4096),
        ("1.5G", 3 * GiB // 2),
        ("0x1000", 4096),
        ("16 GiB", 16 * GiB),
        ("8k", 8 * KiB),
        ("1T", 1 << 40),
        (12, 12),
    ],
)
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "x", "-1", "1.0000001K", "2Q", "0x10M", -5, True])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips_exact_units(n: int) -> None:
    text = format_size(n)
    if "." not in text:
        assert parse_size(text.replace(" ", "")) == n
