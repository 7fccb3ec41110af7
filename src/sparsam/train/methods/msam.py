"""Momentum-SAM (one pass per step, perturbed along the momentum) and sparse MSAM (with SSAM's
``--mask``). A family of its own: no ascent pass, so none of SAM's ascent settings (ASAM,
``--ascent``, the schedule, the sub-batch ascent) apply, and it is built from other arguments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ._spec import BuildContext, MaskSpec, MethodStyle, OptimizerSpec, Settings, hex_color, is_scheduled
from .sam import SAM_KEYS
from .ssam import mask_data, mask_style

if TYPE_CHECKING:
    from torch.optim import Optimizer

#: settings of MSAM (one pass: no ASAM, no ascent, no schedule)
_MSAM_KEYS = frozenset({"rho", "eps"}) & SAM_KEYS | {"rho"}


def _msam_kwargs(ctx: BuildContext) -> dict[str, Any]:
    """SAM's arguments less those MSAM has no use for (no ascent pass: no ASAM, no ``--ascent``)."""
    kwargs = ctx.sam_kwargs()
    for key in ("adaptive", "eta", "ascent"):
        kwargs.pop(key, None)
    return kwargs


def _msam(ctx: BuildContext) -> Optimizer:
    from ...optim.msam import MSAM

    return MSAM(ctx.base, **_msam_kwargs(ctx))


def _smsam(ctx: BuildContext) -> Optimizer:
    from ...optim.msam import SparseMSAM

    cfg = ctx.cfg
    mask = ctx.mask()
    return SparseMSAM(
        ctx.base,
        mask=mask,
        norm=cfg.norm,
        loss_fn=ctx.loss_fn,
        data=mask_data(ctx, mask),
        batch_size=cfg.batch_size,
        **_msam_kwargs(ctx),
    )


def _check_msam(cfg: Settings) -> None:
    if cfg.adaptive:
        raise ConfigError(f"--opt {cfg.opt} has no adaptive (ASAM) form: drop --adaptive")
    if is_scheduled(cfg):
        raise ConfigError(
            f"--opt {cfg.opt} runs one pass per step with no ascent to schedule or cut: "
            "--sam-every/--sam-start/--rho-ramp/--ascent-fraction do not apply"
        )
    if cfg.base == "sgd" and cfg.momentum == 0:
        raise ConfigError(f"--opt {cfg.opt} perturbs along SGD's momentum: it needs --momentum > 0, got 0")
    if cfg.opt == "smsam" and (cfg.sparse_ascent or cfg.form != "explicit"):
        raise ConfigError(
            f"--opt smsam has no ascent pass: --sparse-ascent and --form implicit do not apply (got --form {cfg.form}"
            + (", --sparse-ascent)" if cfg.sparse_ascent else ")")
        )


def _msam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    # one pass per step, at SGD's cost: a gold-olive hue no other method has
    return MethodStyle(hex_color(52, 0.36, 0.75), "MSAM", "cheaper SAM", "h")


def _smsam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    # the same hue, lighter, with the mask's words
    return MethodStyle(hex_color(52, 0.52, 0.75), f"sparse MSAM ({mask_style(s, mask)[0]})", "cheaper SAM", "H")


OPTIMIZERS = (
    OptimizerSpec(
        "msam",
        "MSAM",
        "msam (Momentum-SAM: one pass, perturbed along the momentum)",
        _msam,
        _msam_style,
        check=_check_msam,
        owns=_MSAM_KEYS,
    ),
    OptimizerSpec(
        "smsam",
        "SMSAM",
        "smsam (sparse MSAM, with SSAM's --mask)",
        _smsam,
        _smsam_style,
        uses_mask=True,
        check=_check_msam,
        owns=_MSAM_KEYS | {"mask", "norm"},
    ),
)
