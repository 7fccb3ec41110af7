"""SGD, SAM and ASAM, with the time schedule (``--sam-every``, ``--sam-start``, ``--rho-ramp``)
and the sub-batch ascent (``--ascent-fraction``) that every SAM-family optimizer composes with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...optim.asam import RULES
from ...optim.sam import ASCENT_MODES
from ..errors import ConfigError
from ..fields import NON_NEGATIVE, Range, setting
from ._spec import BuildContext, MaskSpec, MethodStyle, OptimizerSpec, Settings, hex_color, is_scheduled
from ._spec import schedule_style as _schedule_style

if TYPE_CHECKING:
    from torch.optim import Optimizer


@dataclass
class SAMSettings:
    """The settings of every SAM-family optimizer: the ascent (rho, ASAM, eps, data-parallel ascent),
    the time schedule and the sub-batch ascent. (rho, eta are checked by SAM's constructor.)"""

    rho: float = setting(0.05, "SAM neighbourhood radius", group="optimizer")
    adaptive: bool | None = setting(
        None, "ASAM's adaptive perturbation (default: on for --opt asam only)", group="optimizer"
    )  # the optimizers with adaptive=True below
    eta: float = setting(0.01, "ASAM offset: T = |w| + eta", group="optimizer")
    asam_rule: str = setting(
        "all",
        "which parameters ASAM scales by |w| + eta: all, or those whose name contains "
        "'weight' (the official ASAM code; biases get the plain SAM ascent)",
        group="optimizer",
        choices=RULES,
    )
    eps: float = setting(
        1e-12,
        "added to the gradient norm in the perturbation rho g / (||g|| + eps) (the SSAM authors' code: 1e-7)",
        group="optimizer",
        range=NON_NEGATIVE,
    )
    ascent: str = setting(
        "local",
        "data parallel: each rank perturbs with its own gradient (local, SAM's m-sharpness) "
        "or with the all-reduced one (sync; the default, and the only one, under --fsdp)",
        group="optimizer",
        choices=ASCENT_MODES,
    )
    sam_every: int = setting(
        1,
        "SAM's ascent on every K-th step only; the other steps run one pass (SGD's cost)",
        group="variants",
        metavar="K",
        range=Range(1),
    )
    sam_start: float = setting(
        0.0,
        "SAM from this fraction of training on (late-phase SAM: 0.75 = the last quarter); before it, plain steps",
        group="variants",
        metavar="FRACTION",
        range=Range(0, 1, hi_open=True, words="a fraction"),
    )
    rho_ramp: float = setting(
        0.0,
        "ramp rho linearly from rho/R to rho over R = FRACTION x training steps, from --sam-start on",
        group="variants",
        metavar="FRACTION",
        range=Range(0, 1, words="a fraction"),
    )
    ascent_fraction: float = setting(
        1.0,
        "the ascent gradient from the first FRACTION of each batch (pass 1 costs that fraction; SAM's m-sharpness)",
        group="variants",
        metavar="FRACTION",
        range=Range(0, 1, lo_open=True, words="a fraction"),
    )


#: settings of every SAM-family optimizer
SAM_KEYS: frozenset[str] = frozenset(f.name for f in dataclasses.fields(SAMSettings))


def schedule_kwargs(ctx: BuildContext) -> dict[str, Any]:
    """``--sam-every`` / ``--sam-start`` / ``--rho-ramp`` / ``--ascent-fraction`` (docs/variants.md); {} when all are off."""
    cfg = ctx.cfg
    if not is_scheduled(cfg):
        return {}
    return dict(
        every=cfg.sam_every,
        start=cfg.sam_start,
        ramp=cfg.rho_ramp,
        total_steps=ctx.total_steps,
        ascent_fraction=cfg.ascent_fraction,
    )


def variant_tag(values: Any) -> str:
    """The run-name suffix of a time schedule or sub-batch ascent (``-every2-start0.75``), "" without."""
    if not is_scheduled(values):
        return ""
    get = values.get if isinstance(values, Mapping) else lambda k, d=None: getattr(values, k, d)
    parts = [
        ("every", get("sam_every", 1), 1),
        ("start", get("sam_start", 0.0), 0.0),
        ("ramp", get("rho_ramp", 0.0), 0.0),
        ("asc", get("ascent_fraction", 1.0), 1.0),
    ]
    return "".join(f"-{name}{value:g}" for name, value, default in parts if value != default)


def _sam(ctx: BuildContext) -> Optimizer:
    from ...optim.sam import SAM
    from ...optim.schedule import ScheduledSAM

    sched = schedule_kwargs(ctx)
    return ScheduledSAM(ctx.base, **sched, **ctx.sam_kwargs()) if sched else SAM(ctx.base, **ctx.sam_kwargs())


def _check_sgd(cfg: Settings) -> None:
    # --adaptive is refused for every optimizer that does not own it, by the registry's check
    if is_scheduled(cfg):
        raise ConfigError(
            f"--sam-every/--sam-start/--rho-ramp/--ascent-fraction apply to SAM-family optimizers, got --opt {cfg.opt}"
        )


def _check_asam(cfg: Settings) -> None:
    if cfg.adaptive is False:
        raise ConfigError("--opt asam is adaptive SAM; --no-adaptive contradicts it (use --opt sam)")


def _sgd_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    return MethodStyle("#8c8c8c", "SGD", "SGD", "s")


def _sam_style(s: Mapping[str, Any], mask: MaskSpec | None) -> MethodStyle:
    adaptive = s.get("adaptive") is True or s.get("opt") == "asam"
    base, color, family, marker = ("ASAM", "#4d4d4d", "SAM", "D") if adaptive else ("SAM", "#000000", "SAM", "o")
    if not is_scheduled(s):
        return MethodStyle(color, base, family, marker, "--" if adaptive else "-")
    label, hue, lightness, marker = _schedule_style(s, base)
    return MethodStyle(hex_color(hue, lightness + (0.1 if adaptive else 0.0), 0.6), label, "cheaper SAM", marker)


OPTIMIZERS = (
    OptimizerSpec("sgd", "SGD", "sgd (base only)", None, _sgd_style, fsdp=True, check=_check_sgd),
    OptimizerSpec("sam", "SAM", "sam", _sam, _sam_style, owns=SAM_KEYS, fsdp=True),
    OptimizerSpec(
        "asam",
        "ASAM",
        "asam (adaptive SAM)",
        _sam,
        _sam_style,
        owns=SAM_KEYS,
        adaptive=True,
        fsdp=True,
        check=_check_asam,
    ),
)
