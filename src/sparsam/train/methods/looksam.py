"""LookSAM (a SAM step every ``--look-k`` steps, the stored component reused in between) and
LookSSAM (the same on SSAM's mask)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fields import AT_LEAST_1, NON_NEGATIVE, setting
from ._spec import (
    BuildContext,
    MaskSpec,
    MethodStyle,
    OptimizerSpec,
    Settings,
    hex_color,
    num,
    with_schedule,
)
from .sam import SAM_KEYS, schedule_kwargs
from .ssam import SSAM_KEYS, mask_style, ssam_kwargs

if TYPE_CHECKING:
    from torch.optim import Optimizer


@dataclass
class LookSAMSettings:
    """LookSAM's settings: how often it runs a SAM step, and how the stored component is reused."""

    look_k: int = setting(
        5,
        "LookSAM: a SAM step every K steps, the stored g_v reused in between",
        group="variants",
        metavar="K",
        range=AT_LEAST_1,
    )
    look_alpha: float = setting(
        0.7, "LookSAM: weight alpha of the reused component g_v", group="variants", range=NON_NEGATIVE
    )
    look_per_tensor: bool = setting(
        False,
        "LookSAM: project and rescale g_v per parameter tensor (the public re-implementations' form; "
        "default: over all parameters at once, as the paper's algorithm)",
        group="variants",
    )


_LOOK_KEYS = frozenset(f.name for f in dataclasses.fields(LookSAMSettings))


def _look_kwargs(ctx: BuildContext) -> dict[str, Any]:
    sched = schedule_kwargs(ctx)
    sched.pop("every", None)  # LookSAM's k is its every-k schedule
    cfg = ctx.cfg
    return dict(k=cfg.look_k, alpha=cfg.look_alpha, per_tensor=cfg.look_per_tensor, **sched)


def _looksam(ctx: BuildContext) -> Optimizer:
    from ...optim.looksam import LookSAM

    return LookSAM(ctx.base, **_look_kwargs(ctx), **ctx.sam_kwargs())


def _lookssam(ctx: BuildContext) -> Optimizer:
    from ...optim.looksam import LookSSAM

    return LookSSAM(ctx.base, **_look_kwargs(ctx), **ssam_kwargs(ctx))


def _check_looksam(cfg: Settings) -> None:
    if cfg.sam_every != 1:
        raise ConfigError(
            f"--opt {cfg.opt} runs SAM every --look-k {cfg.look_k} steps; --sam-every {cfg.sam_every} "
            "contradicts it (leave --sam-every at 1)"
        )


def _check_lookssam(cfg: Settings) -> None:
    _check_looksam(cfg)
    # LookSAM projects g_s on pass 1's gradient g = ∇L(w): it needs that gradient whole.
    if cfg.sparse_ascent:
        raise ConfigError(
            f"--opt {cfg.opt} needs pass 1's full gradient (g_v is g_s minus its projection on it); "
            "--sparse-ascent leaves the unperturbed tensors out of it: drop --sparse-ascent"
        )
    if cfg.form != "explicit":
        raise ConfigError(
            f"--opt {cfg.opt} needs --form explicit, got --form {cfg.form}: the implicit form's pass 1 runs a masked "
            "backward, so its gradient is not the one LookSAM projects on"
        )


def _looksam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    label = f"LookSAM-{int(num(s.get('look_k'), 5))}"
    return MethodStyle(hex_color(265, 0.42, 0.55), with_schedule(s, label), "cheaper SAM", "P")


def _lookssam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    label = f"LookSSAM-{int(num(s.get('look_k'), 5))} ({mask_style(s, mask)[0]})"
    return MethodStyle(hex_color(280, 0.62, 0.55), with_schedule(s, label), "cheaper SAM", "X")


OPTIMIZERS = (
    OptimizerSpec(
        "looksam",
        "LookSAM",
        "looksam (SAM every --look-k steps, g_v reused)",
        _looksam,
        _looksam_style,
        check=_check_looksam,
        owns=SAM_KEYS | _LOOK_KEYS,
    ),
    OptimizerSpec(
        "lookssam",
        "LookSSAM",
        "lookssam (LookSAM with SSAM's --mask)",
        _lookssam,
        _lookssam_style,
        uses_mask=True,
        check=_check_lookssam,
        owns=SAM_KEYS | SSAM_KEYS | _LOOK_KEYS,
    ),
)
