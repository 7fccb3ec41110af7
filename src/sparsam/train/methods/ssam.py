"""SSAM: the optimizer that takes a mask (``--opt ssam``) and the mask sources (``--mask``).

A new mask source is its file in ``sparsam/masks/`` and one ``MaskSpec`` in ``MASKS`` here: its
name, builder, checks, the settings it owns, whether it runs under ``--fsdp`` and its hue.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._spec import (
    SAM_KEYS,
    BuildContext,
    MaskSpec,
    MethodStyle,
    OptimizerSpec,
    Settings,
    hex_color,
    is_scheduled,
    num,
    pct,
    schedule_style,
)
from .sam import schedule_kwargs

if TYPE_CHECKING:
    from torch.optim import Optimizer

#: settings of every optimizer that takes SSAM's mask
SSAM_KEYS = frozenset({"mask", "form", "norm", "sparse_ascent", "implicit_layers"})
_SELECTION_KEYS = frozenset(
    {"sparsity", "pattern", "granularity", "nm", "budget", "fill", "mask_update_epochs", "mask_timing"}
)


# ------------------------------------------------------------------------------------------ builders
def _period(ctx: BuildContext) -> dict[str, Any]:
    every = ctx.cfg.mask_update_epochs or None
    return {"update_every_epochs": every, "steps_per_epoch": ctx.steps_per_epoch if every else None}


def _selection(cfg: Settings) -> tuple[float | None, dict[str, Any]]:
    """(sparsity, select() options) of ``--pattern`` / ``--nm`` / ``--granularity`` / ``--budget``."""
    if cfg.pattern == "nm":
        n, m = cfg.nm_pair()
        return None, {"pattern": f"{n}:{m}", "granularity": cfg.granularity, "budget": cfg.budget, "fill": cfg.fill}
    return cfg.sparsity, {
        "pattern": cfg.pattern,
        "granularity": cfg.granularity,
        "budget": cfg.budget,
        "fill": cfg.fill,
    }


def _fisher(ctx: BuildContext) -> Any:
    from ...masks import FisherMask

    cfg = ctx.cfg
    sparsity, selection = _selection(cfg)
    return FisherMask(
        sparsity,
        cfg.num_samples,
        true_fisher=cfg.true_fisher,
        bn_stats=cfg.fisher_bn_stats,
        timing=cfg.mask_timing,
        seed=cfg.seed,
        **selection,
        **_period(ctx),
    )


def _random(ctx: BuildContext) -> Any:
    from ...masks import RandomMask

    sparsity, selection = _selection(ctx.cfg)
    return RandomMask(sparsity, seed=ctx.cfg.seed, **selection, **_period(ctx))


def _dynamic(ctx: BuildContext) -> Any:
    from ...masks import DynamicMask

    cfg = ctx.cfg
    return DynamicMask(
        cfg.sparsity,
        ctx.total_steps,
        alpha=cfg.dynamic_alpha,
        drop=cfg.drop,
        grow=cfg.grow,
        budget=cfg.budget,
        timing=cfg.mask_timing,
        counts=cfg.dynamic_counts,
        seed=cfg.seed,
        **_period(ctx),
    )


def _norm(ctx: BuildContext) -> Any:
    from ...masks import NormLayersMask

    return NormLayersMask()


def mask_data(ctx: BuildContext, mask: Any) -> Any:
    """The data a mask source draws from (SSAM-F's Fisher samples), or None."""
    return ctx.fisher_data if getattr(mask, "needs_data", False) else None


def ssam_kwargs(ctx: BuildContext) -> dict[str, Any]:
    """SSAM's arguments: the mask source, its data and the form of the perturbation."""
    cfg = ctx.cfg
    mask = ctx.mask()
    return dict(
        mask=mask,
        norm=cfg.norm,
        loss_fn=ctx.loss_fn,
        data=mask_data(ctx, mask),
        form=cfg.form,
        sparse_ascent=cfg.sparse_ascent,
        implicit_layers=cfg.implicit_layers,
        **ctx.sam_kwargs(),
    )


def _ssam(ctx: BuildContext) -> Optimizer:
    from ...optim.schedule import ScheduledSSAM
    from ...optim.ssam import SSAM

    sched = schedule_kwargs(ctx)
    return ScheduledSSAM(ctx.base, **sched, **ssam_kwargs(ctx)) if sched else SSAM(ctx.base, **ssam_kwargs(ctx))


# ------------------------------------------------------------------------------------------ checks
def _check_unstructured_only(what: str) -> Any:
    def check(cfg: Settings) -> None:
        if cfg.pattern != "unstructured":
            raise ConfigError(f"--mask {cfg.mask} {what}, got --pattern {cfg.pattern}")

    return check


def _check_dynamic(cfg: Settings) -> None:
    _check_unstructured_only("supports only --pattern unstructured")(cfg)
    if cfg.mask_update_epochs == 0:
        raise ConfigError("--mask dynamic needs --mask-update-epochs >= 1 (it is a schedule of mask updates), got 0")


def _check_ssam(cfg: Settings) -> None:
    if cfg.sparse_ascent and cfg.norm != "masked":
        raise ConfigError(
            "--sparse-ascent needs --norm masked: with the full-gradient norm the ascent pass needs every gradient"
        )
    if cfg.sparse_ascent and cfg.form != "explicit":
        raise ConfigError("--sparse-ascent needs --form explicit: the implicit form perturbs densely")


# ------------------------------------------------------------------------------------------ figure style
# Sparsity -> lightness (piecewise linear): 50% dark, 90% middle, 99% light.
_LIGHTNESS = ((0.0, 0.2), (0.5, 0.27), (0.8, 0.38), (0.9, 0.47), (0.95, 0.55), (0.99, 0.65), (0.999, 0.74))
# (hue shift, lightness shift) of a pattern: structured towards indigo, N:M towards cyan; marker per pattern
_PATTERN_SHIFT = {"unstructured": (0.0, 0.0), "structured": (24.0, 0.06), "nm": (-22.0, 0.1)}
_PATTERN_MARKER = {"unstructured": "o", "structured": "s", "nm": "^"}


def _lightness(sparsity: float) -> float:
    pts = _LIGHTNESS
    if sparsity <= pts[0][0]:
        return pts[0][1]
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if sparsity <= s1:
            return l0 + (l1 - l0) * (sparsity - s0) / (s1 - s0)
    return pts[-1][1]


def _nm(settings: Mapping[str, Any]) -> tuple[int, int] | None:
    try:
        n, m = (int(p) for p in str(settings.get("nm", "2:4")).split(":"))
    except ValueError:
        return None
    return (n, m) if 0 < n <= m else None


def mask_style(s: Mapping[str, Any], mask: MaskSpec | None) -> tuple[str, str, float, float, str]:
    """(label, family, hue, lightness, marker) of an SSAM-family method's mask."""
    if mask is not None and mask.words:
        return mask.words, mask.family, mask.hue, 0.45, "D"
    pattern = str(s.get("pattern", "unstructured"))
    nm = _nm(s) if pattern == "nm" else None
    sparsity = 1 - nm[0] / nm[1] if nm else num(s.get("sparsity"), 0.5)
    short = mask.label if mask is not None else str(s.get("mask", "fisher"))
    label = f"SSAM-{short}, {pct(sparsity)}"
    if nm:
        label += f", {nm[0]}:{nm[1]}"
    elif pattern != "unstructured":
        label += f", {pattern}"
    dhue, dlight = _PATTERN_SHIFT.get(pattern, (36.0, 0.12))
    hue = (mask.hue if mask is not None else 240.0) + dhue
    marker = _PATTERN_MARKER.get(pattern, "v")
    family = mask.family if mask is not None else "other SSAM"
    return label, family, hue, _lightness(sparsity) + dlight, marker


def _ssam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    label, family, hue, lightness, marker = mask_style(s, mask)
    if s.get("adaptive") is True:
        label += ", adaptive"
    if not is_scheduled(s):
        return MethodStyle(hex_color(hue, lightness), label, family, marker)
    label, hue, lightness, marker = schedule_style(s, label)  # SSAM on a schedule: the schedule's hue, lighter
    return MethodStyle(hex_color(hue, lightness + 0.15, 0.55), label, "cheaper SAM", marker, "--")


# ------------------------------------------------------------------------------------------ the specs
OPTIMIZERS = (
    OptimizerSpec(
        "ssam",
        "SSAM",
        "ssam (sparse SAM)",
        _ssam,
        _ssam_style,
        uses_mask=True,
        fsdp=True,
        check=_check_ssam,
        owns=SAM_KEYS | SSAM_KEYS,
    ),
)

#: ``--mask`` values (SSAM mask sources), in report order.
MASKS = (
    MaskSpec(
        "fisher",
        "f",
        "F",
        "fisher (SSAM-F)",
        _fisher,
        hue=212.0,
        family="SSAM-F",
        fsdp=True,
        owns=_SELECTION_KEYS | {"num_samples", "true_fisher", "fisher_bn_stats", "fisher_augment"},
    ),
    MaskSpec(
        "dynamic",
        "d",
        "D",
        "dynamic (SSAM-D)",
        _dynamic,
        hue=27.0,
        family="SSAM-D",
        fsdp=True,
        check=_check_dynamic,
        owns=frozenset(
            {
                "sparsity",
                "budget",
                "mask_update_epochs",
                "mask_timing",
                "dynamic_alpha",
                "drop",
                "grow",
                "dynamic_counts",
            }
        ),
    ),
    MaskSpec("random", "r", "R", "random", _random, hue=335.0, fsdp=True, owns=_SELECTION_KEYS),
    MaskSpec(
        "norm",
        "n",
        "N",
        "norm (normalisation layers only, SAM-ON)",
        _norm,
        hue=305.0,
        words="norm layers only",
        sparse=False,
        fsdp=True,
        check=_check_unstructured_only("has no pattern (it perturbs whole normalisation layers)"),
    ),
)
