"""The one list of training methods: optimizers (``--opt``) and SSAM mask sources (``--mask``).

Everything that needs to know which methods exist reads this package: the config (choices, help,
validation, run labels and default run names, what ``--fsdp`` runs), the builder
(``sparsam.train.build``), the presets' listing, ``sparsam sweep`` / ``sparsam demo``, the report's
tables (labels, row order, which settings matter for a run) and its figures (colour, label in
words, family, marker). Nothing else lists them.

One module per family holds everything its methods are: ``sam`` (SGD, SAM, ASAM, the time
schedule and the sub-batch ascent), ``ssam`` (SSAM and the mask sources), ``looksam``, ``esam``,
``msam``. Each declares its ``OptimizerSpec`` / ``MaskSpec`` entries: builder, checks, the settings
it owns, whether it runs under ``--fsdp``, and its figure style.

A method name is an optimizer name (``sgd``, ``sam``, ``asam``) or, for an optimizer that takes a
mask, ``<optimizer>-<mask short name>`` (``ssam-f`` = ``--opt ssam --mask fisher``).

Adding a mask source: write it in ``sparsam/masks/`` and add one ``MaskSpec`` to ``MASKS`` in
``methods/ssam.py``. Adding a SAM variant: write the optimizer (a [`SAM`][sparsam.SAM] subclass,
see ``docs/design.md``) and a module ``methods/<variant>.py`` with its ``OptimizerSpec``, listed in
``_FAMILIES`` below. Settings of its own are a settings dataclass in that module (``SAMSettings``,
``SSAMSettings``, ...: fields made with ``train.fields.setting``, choices imported from the core, numeric
ranges declared), which ``TrainConfig`` inherits; its ``owns`` names them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from . import esam, looksam, msam, sam, ssam
from ._spec import (
    FAMILIES,
    REFERENCES,
    BuildContext,
    MaskSpec,
    MethodStyle,
    OptimizerSpec,
    Settings,
    hex_color,
    is_scheduled,
)
from .esam import ESAMSettings
from .looksam import LookSAMSettings
from .sam import SAM_KEYS, SAMSettings, variant_tag
from .ssam import SSAMSettings

if TYPE_CHECKING:
    from torch.optim import Optimizer

# The families, in report order.
_FAMILIES = (sam, ssam, looksam, esam, msam)

#: ``--opt`` values, in report order.
OPTIMIZERS: dict[str, OptimizerSpec] = {s.name: s for family in _FAMILIES for s in family.OPTIMIZERS}

#: ``--mask`` values (SSAM mask sources), in report order.
MASKS: dict[str, MaskSpec] = {s.name: s for s in ssam.MASKS}


def _all_methods() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for opt in OPTIMIZERS.values():
        if not opt.uses_mask:
            out[opt.name] = {"opt": opt.name}
        else:
            for mask in MASKS.values():
                out[f"{opt.name}-{mask.short}"] = {"opt": opt.name, "mask": mask.name}
    return out


METHODS: dict[str, dict[str, Any]] = _all_methods()
"""Method name -> config values (``ssam-f`` -> ``{"opt": "ssam", "mask": "fisher"}``), in report order."""


def _parts(values: Any) -> tuple[OptimizerSpec | None, MaskSpec | None]:
    """(optimizer, mask or None) of a TrainConfig or a config dict; None for names not (or no longer) known."""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    opt = OPTIMIZERS.get(get("opt", "sgd"))
    mask = MASKS.get(get("mask", "fisher")) if opt is not None and opt.uses_mask else None
    return opt, mask


def method_name(values: Any) -> str:
    """The method name of a config (TrainConfig or dict): ``sgd``, ``sam``, ``ssam-f``, ..."""
    opt, mask = _parts(values)
    if opt is None:
        return str(values.get("opt") if isinstance(values, dict) else values.opt)
    return opt.name if mask is None else f"{opt.name}-{mask.short}"


def method_label(values: Any) -> str:
    """The report's label of a config: ``SGD``, ``SAM``, ``SSAM-F``, ``SSAM-N (norm layers only)``, ..."""
    opt, mask = _parts(values)
    if opt is None:
        return method_name(values).upper()
    if mask is None:
        return opt.label
    return f"{opt.label}-{mask.label}" + (f" ({mask.words})" if mask.words else "")


def method_style(settings: Mapping[str, Any]) -> MethodStyle:
    """The figure style of a run's method from the identity settings that matter for it (see
    ``sparsam.runs.figures.method_style``, which picks them from a config)."""
    opt, mask = _parts(dict(settings))
    if opt is None:  # an optimizer this version does not know: a stable colour from its name
        name = str(settings.get("opt", "sgd"))
        return MethodStyle(hex_color(sum(map(ord, name)) * 47 % 360, 0.45, 0.5), name.upper(), "other", "h")
    return opt.style(settings, mask)


def method_order(values: Any) -> int:
    """Position of a config's method in [`METHODS`][sparsam.train.METHODS] (report row order)."""
    name = method_name(values)
    return list(METHODS).index(name) if name in METHODS else len(METHODS)


def is_sparse(values: Any) -> bool:
    """Does the method depend on ``--sparsity``?"""
    _, mask = _parts(values)
    return mask is not None and mask.sparse


#: methods whose runs depend on --sparsity
SPARSE_METHODS: tuple[str, ...] = tuple(n for n, v in METHODS.items() if is_sparse(v))

#: config keys owned by some optimizer or mask; every other key matters for every method
OWNED_KEYS: frozenset[str] = frozenset().union(
    *(o.owns for o in OPTIMIZERS.values()), *(m.owns for m in MASKS.values())
)


def relevant(key: str, values: Any) -> bool:
    """Does config ``key`` matter for the method of ``values``? (Keys nobody owns matter for all.)"""
    if key not in OWNED_KEYS:
        return True
    opt, mask = _parts(values)
    return (opt is not None and key in opt.owns) or (mask is not None and key in mask.owns)


def method_values(name: str) -> dict[str, Any]:
    """The config values of a method name; ConfigError naming the known ones otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return dict(METHODS[name])


def check(cfg: Settings) -> None:
    """The optimizer's and the mask's own cross-field checks; ``--adaptive`` for an optimizer
    that has no adaptive form."""
    opt, mask = _parts(cfg)
    for spec in (opt, mask):
        if spec is not None and spec.check is not None:
            spec.check(cfg)
    if cfg.adaptive and opt is not None and "adaptive" not in opt.owns:
        sam_family = "/".join(n for n, o in OPTIMIZERS.items() if "adaptive" in o.owns)
        raise ConfigError(f"--adaptive applies to {sam_family}, got --opt {cfg.opt}")


def _and(names: Iterable[str]) -> str:
    """``a, b and c``."""
    items = list(names)
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def check_fsdp(cfg: Settings) -> None:
    """What ``--fsdp`` supports (docs/scaling.md): the methods whose specs say ``fsdp=True`` (each enabled
    once tests/test_fsdp.py checked it), the synchronised ascent, and their specs' own ``fsdp_check``."""
    opt, mask = _parts(cfg)
    if opt is None or not opt.fsdp:
        raise ConfigError(
            f"--fsdp supports --opt {_and(n for n, o in OPTIMIZERS.items() if o.fsdp)}, got --opt {cfg.opt} "
            "(use DDP: drop --fsdp)"
        )
    if mask is not None and not mask.fsdp:
        raise ConfigError(
            f"--fsdp with --opt {cfg.opt} supports --mask {_and(n for n, m in MASKS.items() if m.fsdp)}, "
            f"got --mask {cfg.mask} (not tested on sharded parameters; use DDP)"
        )
    if "ascent" in opt.owns and cfg.ascent != "sync":
        raise ConfigError(
            f"--fsdp needs --ascent sync (its default), got --ascent {cfg.ascent}: FSDP reduce-scatters every "
            "gradient, so a rank only holds its shard of the averaged gradient and no per-rank ascent exists"
        )
    # --sam-every/--sam-start/--rho-ramp decide per step whether it perturbs (the same on every rank);
    # --ascent-fraction: every rank runs pass 1 on its first fraction, so FSDP's reduce-scatter pairs up.
    for spec in (mask, opt):
        if spec is not None and spec.fsdp_check is not None:
            spec.fsdp_check(cfg)


def fsdp_runs(cfg: Settings) -> bool:
    """Does the method of ``cfg`` run under ``--fsdp`` (its optimizer, and its mask if it takes one)?"""
    opt, mask = _parts(cfg)
    return opt is not None and opt.fsdp and (mask is None or mask.fsdp)


def build_optimizer(ctx: BuildContext) -> Optimizer:
    """The optimizer ``ctx.cfg`` names (the base optimizer itself for ``--opt sgd``)."""
    spec = OPTIMIZERS[ctx.cfg.opt]
    if spec.build is None:
        return ctx.base
    if spec.uses_mask:
        ctx = dataclasses.replace(ctx, mask_builder=MASKS[ctx.cfg.mask].build)
    return spec.build(ctx)


__all__ = [
    "FAMILIES",
    "MASKS",
    "METHODS",
    "OPTIMIZERS",
    "REFERENCES",
    "SAM_KEYS",
    "SPARSE_METHODS",
    "BuildContext",
    "ESAMSettings",
    "LookSAMSettings",
    "MaskSpec",
    "MethodStyle",
    "OptimizerSpec",
    "SAMSettings",
    "SSAMSettings",
    "Settings",
    "build_optimizer",
    "check",
    "check_fsdp",
    "fsdp_runs",
    "is_scheduled",
    "is_sparse",
    "method_label",
    "method_name",
    "method_order",
    "method_style",
    "method_values",
    "relevant",
    "variant_tag",
]
