"""SSAM: the optimizer that takes a mask (``--opt ssam``) and the mask sources (``--mask``).

A new mask source is its file in ``sparsam/masks/`` and one ``MaskSpec`` in ``MASKS`` here: its
name, builder, checks, the settings it owns, whether it runs under ``--fsdp`` and its hue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...masks.base import TIMINGS
from ...masks.dynamic import COUNTS, DROP, GROW
from ...masks.fisher import BN_STATS
from ...masks.selection import BUDGETS, FILLS, GRANULARITIES, PATTERNS, parse_pattern
from ...optim.implicit import IMPLICIT_LAYERS
from ...optim.ssam import FORMS, NORMS
from ..errors import ConfigError
from ..fields import AT_LEAST_1, NON_NEGATIVE, Range, bad, setting
from ._spec import (
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
from .sam import SAM_KEYS, schedule_kwargs

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


def _check_ssam_fsdp(cfg: Settings) -> None:
    if cfg.form != "explicit":
        raise ConfigError(f"--fsdp supports --form explicit only, got --form {cfg.form}")
    if cfg.sparse_ascent or (cfg.sparse_ascent is None and cfg.norm == "masked"):
        raise ConfigError(
            "--fsdp cannot skip weight gradients in the ascent pass (--sparse-ascent, the default with --norm "
            "masked): a rank whose shard is unmasked would leave FSDP's reduce-scatter; pass --no-sparse-ascent"
        )


def _check_fisher_fsdp(cfg: Settings) -> None:
    if cfg.pattern == "structured" and cfg.granularity == "tensor":
        raise ConfigError(
            "--fsdp with --mask fisher --pattern structured needs --granularity channel: a whole tensor's mean "
            "Fisher would be summed over the shards, whose rounding differs from one process's"
        )


def _check_dynamic_fsdp(cfg: Settings) -> None:
    if cfg.dynamic_counts != "exact":
        raise ConfigError(
            f"--fsdp with --mask dynamic supports --dynamic-counts exact only, got --dynamic-counts {cfg.dynamic_counts}"
        )


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
        fsdp_check=_check_ssam_fsdp,
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
        fsdp_check=_check_fisher_fsdp,
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
        fsdp_check=_check_dynamic_fsdp,
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


# ------------------------------------------------------------------------------------------ the settings
@dataclass
class SSAMSettings:
    """The settings of SSAM and of the optimizers that take its mask: the mask source, its selection
    (sparsity, pattern, budget, ...), its updates, the Fisher and dynamic sources' own settings, and the
    form and norm of the perturbation. (dynamic_alpha is checked by DynamicMask.)"""

    sparsity: float = setting(
        0.5,
        "SSAM: fraction of coordinates NOT perturbed",
        group="ssam",
        range=Range(0, 1, hi_open=True, note="the fraction of coordinates NOT perturbed"),
    )
    mask: str = setting(
        "fisher",
        "SSAM mask source: " + ", ".join(m.help for m in MASKS),
        group="ssam",
        choices=[m.name for m in MASKS],
    )
    pattern: str = setting("unstructured", "mask pattern", group="ssam", choices=PATTERNS)
    granularity: str = setting(
        "tensor", "structured pattern unit: whole tensors or output channels", group="ssam", choices=GRANULARITIES
    )
    nm: str = setting("2:4", "N:M pattern (with --pattern nm): keep N of every M weights", group="ssam", metavar="N:M")
    budget: str = setting("global", "one budget over all parameters, or one per layer", group="ssam", choices=BUDGETS)
    form: str = setting(
        "explicit",
        "explicit: mask the perturbation; implicit: dense perturbation, masked input gradients in the ascent backward",
        group="ssam",
        choices=FORMS,
    )
    norm: str = setting(
        "full",
        "perturbation norm: full gradient (the authors') or masked gradient (||e|| = rho)",
        group="ssam",
        choices=NORMS,
    )
    sparse_ascent: bool | None = setting(
        None,
        "skip weight gradients of unperturbed tensors in the ascent pass (default: on with --norm masked)",
        group="ssam",
    )
    num_samples: int = setting(128, "SSAM-F: Ns, samples of the Fisher information", group="ssam", range=AT_LEAST_1)
    mask_update_epochs: int = setting(
        1, "update the mask every this many epochs (0: never)", group="ssam", range=NON_NEGATIVE
    )
    dynamic_alpha: float = setting(0.5, "SSAM-D: initial drop rate alpha of the cosine schedule", group="ssam")
    grow: str = setting(
        "random", "SSAM-D: grow at random, by largest |g| or by largest |w|", group="ssam", choices=GROW
    )
    drop: str = setting(
        "gradient", "SSAM-D: drop the smallest |g|, the smallest |w| or at random", group="ssam", choices=DROP
    )
    mask_timing: str = setting(
        "before-step",
        "when masks are made: before-step (first mask before step 0, new masks "
        "serve the step they are made at) or after-step (the authors': SSAM-F starts all-zero so "
        "only step 0 is unperturbed, each mask is made after the step and serves from the next)",
        group="ssam",
        choices=TIMINGS,
    )
    fill: str = setting(
        "first-fit",
        "structured pattern: meet the global budget first-fit (never exceeds it) or "
        "overshoot (the authors': whole tensors by decreasing mean until the budget is reached)",
        group="ssam",
        choices=FILLS,
    )
    implicit_layers: str = setting(
        "conv+linear",
        "implicit form: the layers whose input gradient is masked (conv = the authors' --samconv)",
        group="ssam",
        choices=IMPLICIT_LAYERS,
    )
    dynamic_counts: str = setting(
        "exact",
        "SSAM-D: exact keeps round((1 - s) N) perturbed coordinates at every update; nominal counts as the "
        "authors' code (N - ceil(N s) at first, then keeps int(L (1 - dr)) and grows int(min(L dr, N s)), "
        "L = N - N s, so the count can end one short)",
        group="ssam",
        choices=COUNTS,
    )
    fisher_augment: bool = setting(
        False,
        "SSAM-F: draw the Fisher samples from the augmented training images (the authors'), not the plain ones",
        group="ssam",
    )
    true_fisher: bool = setting(
        False, "SSAM-F: sample labels from the model (true Fisher) instead of the targets", group="ssam"
    )
    fisher_bn_stats: str = setting(
        "running", "SSAM-F: BatchNorm statistics of the per-sample passes", group="ssam", choices=BN_STATS
    )

    def nm_pair(self) -> tuple[int, int]:
        """(N, M) of ``--nm``, parsed as the mask selection parses patterns; ConfigError naming the value."""
        try:
            kind, n, m = parse_pattern(self.nm)
        except (ValueError, TypeError) as e:
            if str(e).startswith("N:M needs"):
                raise bad("nm", self.nm, "needs 1 <= N <= M") from None
            kind, n, m = "", None, None
        if kind != "nm" or n is None or m is None:
            raise bad("nm", self.nm, "must look like N:M, e.g. 2:4")
        return n, m


# every key an SSAM optimizer or a mask source owns is one of these settings
assert SSAM_KEYS.union(*(m.owns for m in MASKS)) <= {f.name for f in dataclasses.fields(SSAMSettings)}
