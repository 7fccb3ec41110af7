"""Argument checks shared by the models, the analysis tools and the optimizers' state loading."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is an int >= 1; else raise naming the argument and the value:
    TypeError for a non-int (a bool included), ValueError for an int below 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {name}={value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {name}={value!r}")
    return value


def _same_setting(saved: Any, built: Any) -> bool:
    if isinstance(saved, list):
        saved = tuple(saved)
    if isinstance(built, list):
        built = tuple(built)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (saved, built))
    if numbers and (isinstance(saved, float) or isinstance(built, float)):
        return bool(saved == built or math.isclose(saved, built, rel_tol=1e-12, abs_tol=0.0))
    return bool(saved == built)


def check_settings(owner: str, saved: Mapping[str, Any] | None, built: Mapping[str, Any]) -> None:
    """The one rule for settings outside the parameter groups when a state is loaded: the built
    object's settings are used, and a saved value that differs is refused. ``saved`` holds the
    settings a state was made with (``None``: not recorded, nothing to compare); only keys in both
    are compared.

    Raises:
        ValueError: naming every differing setting with the saved and the built value.
    """
    if saved is None:
        return
    if not isinstance(saved, Mapping):
        raise TypeError(f"the state's settings of {owner} must be a dict, got {type(saved).__name__}")
    diffs = [
        f"{k}: saved {saved[k]!r}, built {v!r}"
        for k, v in built.items()
        if k in saved and not _same_setting(saved[k], v)
    ]
    if diffs:
        raise ValueError(
            f"the state was made with other settings than this {owner} was built with ({'; '.join(diffs)}): the "
            "built object's settings are the ones used, never the saved ones, so loading it would continue a "
            f"different run. Build the {owner} with the saved settings to resume it"
        )
