"""Durations in the config file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuwunel_guard.config.durations import format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2d", 172800),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        (" 1h 5s ", 3605),
    ],
)
def test_parse_duration_units(text: str, seconds: float) -> None:
    """Each unit and combinations of units give seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "15", "m", "15x", "-5s", "1h-5m", "5 minutes", "1e3s", "1h1h", "5m30s5m"]
)
def test_parse_duration_rejects(text: str) -> None:
    """Invalid text raises a ValueError that names the value and shows valid forms."""
    with pytest.raises(ValueError, match="such as 90s, 15m or 1h30m"):
        parse_duration(text)


@given(st.integers(min_value=0, max_value=10**7))
def test_format_duration_round_trips(seconds: int) -> None:
    """format_duration writes what parse_duration reads back exactly."""
    assert parse_duration(format_duration(seconds)) == seconds
