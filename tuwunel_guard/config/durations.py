"""Durations written like ``90s``, ``15m``, ``1h`` or ``1h30m``."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Return the seconds in ``text``; raise ``ValueError`` naming the value if it is invalid."""
    compact = text.strip().replace(" ", "")
    parts = _PART.findall(compact)
    units = [unit for _, unit in parts]
    repeated = len(set(units)) != len(units)
    if not compact or repeated or "".join(number + unit for number, unit in parts) != compact:
        raise ValueError(
            f"invalid duration {text!r}: write a number with a unit (ms, s, m, h, d), "
            "such as 90s, 15m or 1h30m"
        )
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def format_duration(seconds: float) -> str:
    """Write ``seconds`` in the shortest form that ``parse_duration`` reads back exactly."""
    if seconds != int(seconds):
        return f"{round(seconds * 1000)}ms"

    remaining = int(seconds)
    if remaining == 0:
        return "0s"

    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
