"""How a setting of [`TrainConfig`][sparsam.train.TrainConfig] is declared, and the generic machinery
that reads the declarations: each value's type and coercion, its range check, and its flag.

A setting is a dataclass field made by ``setting``: its help, its
``--help`` group, its choices (import them from the module that defines them), whether it is part of
the run's identity, and its numeric range (a ``Range``), which
``check_ranges`` checks for every field in one loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

#: the ``--help`` sections, in order; every setting names one
GROUPS: tuple[str, ...] = ("data", "model", "optimizer", "ssam", "variants", "schedule", "engine", "run")


@dataclass(frozen=True)
class Range:
    """The values a number may take: ``lo``/``hi`` bounds (None: unbounded), each included or not.

    Its error reads ``--flag must be <words> in [lo, hi), got value`` for two bounds and
    ``--flag must be >= lo, got value`` for one; ``words`` (``"a fraction"``) and ``note`` (appended
    in parentheses) say what the number is. A float outside the bounds or not finite is refused;
    None passes (the setting's "off"/"default").
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    words: str = ""
    note: str = ""

    def __contains__(self, v: float) -> bool:
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def requirement(self) -> str:
        if self.lo is not None and self.hi is not None:
            span = f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
            text = f"must be {self.words + ' ' if self.words else ''}in {span}"
        elif self.lo is not None:
            text = f"must be {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"must be {'<' if self.hi_open else '<='} {self.hi:g}"
        return f"{text} ({self.note})" if self.note else text


POSITIVE = Range(0, lo_open=True)  # > 0
NON_NEGATIVE = Range(0)  # >= 0
AT_LEAST_1 = Range(1)  # >= 1


def setting(
    default: Any,
    help: str,
    *,
    group: str,
    choices: Sequence[str] | None = None,
    identity: bool = True,
    metavar: str | None = None,
    nargs: int | None = None,
    range: Range | None = None,
) -> Any:
    """A config field: its default, ``--help`` text and group, choices, and range. ``identity=False``
    marks run control (may change on resume)."""
    assert group in GROUPS, group
    meta = {
        "help": help,
        "group": group,
        "choices": tuple(choices) if choices else None,
        "identity": identity,
        "metavar": metavar,
        "nargs": nargs,
        "range": range,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def ordered_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    """A settings dataclass's fields by name, in ``--help`` order: by group (``GROUPS``), and within
    a group the class's own fields first, then those of its bases (the method families) in the
    order the bases are listed."""
    own = [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
    inherited: list[dataclasses.Field[Any]] = []
    for base in cls.__bases__:
        if dataclasses.is_dataclass(base):
            inherited += [f for f in dataclasses.fields(base) if f not in inherited]
    fields = sorted(own + inherited, key=lambda f: GROUPS.index(f.metadata["group"]))
    return {f.name: f for f in fields}


def flag(name: str) -> str:
    """The command-line flag of a config key: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def bad(name: str, value: Any, requirement: str) -> ConfigError:
    """``--flag <requirement>, got <value>``."""
    return ConfigError(f"{flag(name)} {requirement}, got {value!r}")


def check_values(
    values: Any,
    fields: Mapping[str, dataclasses.Field[Any]],
    types: Mapping[str, tuple[type, bool]],
    more_choices: Mapping[str, Sequence[str]],
) -> None:
    """Every field's type and choices (``more_choices``: the values listed beyond them, which are
    expanded before validation), then its declared range; ConfigError naming the flag and value."""
    for name, f in fields.items():
        v = getattr(values, name)
        coerce(*types[name], name, v, "command line")  # types (config files are checked on reading)
        choices = f.metadata["choices"]
        if choices and v not in choices:
            known = (*choices, *more_choices.get(name, ()))
            close = difflib.get_close_matches(str(v), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{flag(name)} must be one of {', '.join(known)}, got {v!r}{hint}")
    check_ranges(values, fields)


def check_ranges(values: Any, fields: Mapping[str, dataclasses.Field[Any]]) -> None:
    """Every field's declared ``range``: a float must be finite and in range, an int in range; None passes."""
    for name, f in fields.items():
        rng: Range | None = f.metadata["range"]
        v = getattr(values, name)
        if rng is None or v is None:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise bad(name, v, "must be a finite number")
        if v not in rng:
            raise bad(name, v, rng.requirement())


# ------------------------------------------------------------------------------------------ value types
def value_types(cls: type) -> dict[str, tuple[type, bool]]:
    """Each field's value type (bool, int, float, str or list, a list of floats) and whether it may be None,
    from the dataclass's resolved annotations."""
    out: dict[str, tuple[type, bool]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        base = args[0] if optional else hint
        out[name] = (typing.get_origin(base) or base, optional)
    return out


def coerce(kind: type, optional: bool, name: str, value: Any, source: str) -> Any:
    """Check (and lightly convert) one value from a config file or JSON: right type, or ConfigError."""
    where = f"{flag(name)} (key {name!r} in {source})" if source != "command line" else flag(name)
    if optional and value is None:
        return None
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if kind is list:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
        ):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    raise AssertionError(f"unhandled field type {kind} of {name}")  # a programming error, not user input


def read_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A flat JSON or TOML file's table (``{"lr": 0.1, "opt": "sam"}``); ConfigError naming ``--config``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_bytes()
    try:
        if p.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text.decode("utf-8"))
        elif p.suffix.lower() == ".json":
            data = json.loads(text.decode("utf-8"))
        else:
            raise ConfigError(f"--config {path}: unsupported file type {p.suffix or '(none)'!r}; use .json or .toml")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"--config {path} is not valid {p.suffix[1:].upper()}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a table/object of settings, got {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------------------ argparse
def _parse_optional(kind: str) -> Any:
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null", ""):
            return None
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind == 'int' else 'a number'} or 'none', got {text!r}"
            ) from None

    parse.__name__ = kind  # argparse names the type in its error message
    return parse


def add_flags(
    parser: argparse.ArgumentParser,
    fields: Mapping[str, dataclasses.Field[Any]],
    types: Mapping[str, tuple[type, bool]],
    defaults: Any,
    more_choices: Mapping[str, Sequence[str]],
) -> None:
    """One flag per field, in argument groups (``"<group> options"``). Defaults are suppressed, so the
    parsed namespace holds only the flags given. ``more_choices``: values a flag takes beyond its field's
    choices (aliases expanded before validation)."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, f in fields.items():
        meta = f.metadata
        group = groups.get(meta["group"])
        if group is None:
            group = groups[meta["group"]] = parser.add_argument_group(f"{meta['group']} options")
        default = getattr(defaults, name)
        shown = "" if default is None else f" (default: {default})"
        kw: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
        kind, optional = types[name]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
            if default is True:  # --x / --no-x: the default goes without saying
                kw["help"] = meta["help"]
        elif kind is list:
            kw.update(type=float, nargs=meta["nargs"], metavar=meta["metavar"])
        elif optional and kind in (int, float):
            kw.update(type=_parse_optional(kind.__name__), metavar=meta["metavar"] or kind.__name__.upper())
        else:
            kw["type"] = kind
            if meta["choices"]:
                kw["choices"] = (*meta["choices"], *more_choices.get(name, ()))
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        group.add_argument(flag(name), **kw)


__all__ = [
    "AT_LEAST_1",
    "GROUPS",
    "NON_NEGATIVE",
    "POSITIVE",
    "Range",
    "add_flags",
    "bad",
    "check_ranges",
    "check_values",
    "coerce",
    "flag",
    "ordered_fields",
    "read_table",
    "value_types",
]
