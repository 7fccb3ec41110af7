"""ESAM: random weight subsets (SWP, ``--esam-beta``) and sharpness-sensitive data selection
(SDS, ``--esam-gamma``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..fields import Range, setting
from ._spec import BuildContext, MaskSpec, MethodStyle, OptimizerSpec, Settings, hex_color, with_schedule
from .sam import SAM_KEYS, schedule_kwargs

if TYPE_CHECKING:
    from torch.optim import Optimizer


@dataclass
class ESAMSettings:
    """ESAM's settings: the weight subsets (SWP) and the data selection (SDS)."""

    esam_beta: float = setting(
        0.6,
        "ESAM: probability that a parameter tensor is perturbed at a step (SWP)",
        group="variants",
        range=Range(0, 1, lo_open=True, words="a fraction"),
    )
    esam_gamma: float = setting(
        0.5,
        "ESAM: fraction of each batch whose loss rose most under the perturbation, used in pass 2 (SDS; 1 = off)",
        group="variants",
        range=Range(0, 1, lo_open=True, words="a fraction"),
    )


_ESAM_KEYS = frozenset(f.name for f in dataclasses.fields(ESAMSettings))


def _esam(ctx: BuildContext) -> Optimizer:
    from ...optim.esam import ESAM

    cfg = ctx.cfg
    return ESAM(
        ctx.base, beta=cfg.esam_beta, gamma=cfg.esam_gamma, seed=cfg.seed, **schedule_kwargs(ctx), **ctx.sam_kwargs()
    )


def _check_esam(cfg: Settings) -> None:
    if cfg.esam_gamma < 1 and cfg.ascent_fraction < 1:
        raise ConfigError(
            f"--esam-gamma {cfg.esam_gamma} (data selection) compares every sample's loss at w and w + e, "
            f"so pass 1 needs the whole batch; --ascent-fraction {cfg.ascent_fraction} leaves part out: "
            "set one of them to 1"
        )


def _esam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    return MethodStyle(hex_color(178, 0.3, 0.7), with_schedule(s, "ESAM"), "cheaper SAM", "*")


OPTIMIZERS = (
    OptimizerSpec(
        "esam",
        "ESAM",
        "esam (random weight subsets, data selection)",
        _esam,
        _esam_style,
        check=_check_esam,
        owns=SAM_KEYS | _ESAM_KEYS,
    ),
)
