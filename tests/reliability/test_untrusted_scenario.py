"""Scenario-file regression tests for what the ``scenario`` fuzz target found."""

from __future__ import annotations

import pytest

from ramdiscard.machine.scenario import ScenarioError, parse_scenario


@pytest.mark.parametrize(
    "text",
    [
        "name = " + "9" * 5000,
        "a = " + "[" * 5000 + "]" * 5000,
        "a = " + "{x=" * 2000 + "1" + "}" * 2000,
    ],
    ids=["5000-digit integer", "deeply nested arrays", "deeply nested inline tables"],
)
def test_pathological_toml_is_a_scenario_error(text: str) -> None:
    with pytest.raises(ScenarioError, match="invalid TOML") as info:
        parse_scenario(text, source="bad.toml")
    assert str(info.value).startswith("bad.toml: ") and "\n" not in str(info.value)
