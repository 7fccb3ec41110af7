"""Named presets: the papers' settings, shipped as JSON files in ``sparsam/configs``.

A file ``configs/<family>.json`` holds ``{"description", "source", "notes", "base": {...},
"variants": {"sgd": {...}, "sam": {...}, ...}}``; preset ``<family>-<variant>`` is ``base``
updated with ``variants[<variant>]``. So ``cifar10-resnet18-ssam-f`` is the CIFAR-10 ResNet-18
setting with SSAM-F.

The SSAM papers' presets follow the authors' released code; their ``"sources"`` mark each value as
an authors' command (file and line), an authors' default, or extrapolated (and from what), and
``docs/differences.md`` lists what still differs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .config import check_keys
from .errors import ConfigError
from .methods import relevant


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    variant: str
    description: str
    notes: tuple[str, ...]
    values: dict[str, Any]
    own: tuple[str, ...] = ()
    """The keys the variant sets over its family's base (what tells it from its siblings)."""


def _families() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    root = resources.files("sparsam").joinpath("configs")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            out[entry.name[: -len(".json")]] = json.loads(entry.read_text(encoding="utf-8"))
    return out


def list_presets() -> dict[str, Preset]:
    """Every preset by name, in sorted order."""
    presets: dict[str, Preset] = {}
    for family, spec in _families().items():
        base = spec.get("base", {})
        for variant, over in spec.get("variants", {"": {}}).items():
            name = f"{family}-{variant}" if variant else family
            values = check_keys({**base, **over}, f"preset {name}")
            presets[name] = Preset(
                name=name,
                family=family,
                variant=variant,
                description=spec.get("description", ""),
                notes=tuple(spec.get("notes", ())),
                values=values,
                own=tuple(k.replace("-", "_") for k in over),
            )
    return dict(sorted(presets.items()))


def get_preset(name: str) -> Preset:
    presets = list_presets()
    if name not in presets:
        import difflib

        close = difflib.get_close_matches(name, presets, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"--preset {name!r} is not a known preset{hint}; `sparsam train --list-presets` lists them")
    return presets[name]


def format_presets() -> str:
    """The preset list as text, grouped by family (for ``--list-presets``)."""
    lines: list[str] = []
    family = None
    for p in list_presets().values():
        if p.family != family:
            family = p.family
            lines.append(f"\n{family}: {p.description}")
            lines += [f"    {n}" for n in p.notes]
        v = p.values
        keys: tuple[str, ...] = (
            "opt",
            "mask",
            "form",
            "pattern",
            "sparsity",
            "rho",
            "weight_decay",
            "epochs",
            "batch_size",
            "lr",
        )
        # then what the variant sets beyond those (sam_every=2, ...), so no two presets of a family read alike
        keys += tuple(k for k in p.own if k not in keys)
        summary = ", ".join(f"{k}={v[k]}" for k in keys if k in v and relevant(k, v))
        lines.append(f"  {p.name:<34} {summary}")
    return "\n".join(lines).lstrip("\n")
