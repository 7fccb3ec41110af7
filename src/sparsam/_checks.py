"""Argument checks shared by the models and the analysis tools."""

from __future__ import annotations

from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1; else raise naming the argument and the value:
    TypeError for a non-int (a bool included), ValueError for an int below 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return value
