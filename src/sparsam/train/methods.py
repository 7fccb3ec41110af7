"""The one list of training methods: optimizers (``--opt``) and SSAM mask sources (``--mask``).

Everything that needs to know which methods exist reads this module: the config (choices, help,
validation, run labels and default run names), the builder (``sparsam.train.build``), the
presets' listing, ``sparsam sweep`` / ``sparsam demo`` and the report (labels, row order, which
settings matter for a run). Nothing else lists them.

A method name is an optimizer name (``sgd``, ``sam``, ``asam``) or, for an optimizer that takes a
mask, ``<optimizer>-<mask short name>`` (``ssam-f`` = ``--opt ssam --mask fisher``).

Adding a mask source: write it in ``sparsam/masks/`` and add one ``MaskSpec`` to
``MASKS``. Adding a SAM variant: write the optimizer (a [`SAM`][sparsam.SAM] subclass, see
``docs/design.md``) and add one ``OptimizerSpec`` to ``OPTIMIZERS``. If it has settings
of its own, add the config fields and name them in ``owns``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from torch.optim import Optimizer

    from .config import TrainConfig


@dataclass
class BuildContext:
    """What a builder may use: the config, the base optimizer and the engine's objects.

    ``model`` is what SAM/SSAM use for BatchNorm (clean-pass statistics), DDP ``no_sync`` and
    parameter names: the DDP wrapper when there is one, never the ``torch.compile`` wrapper.
    """

    cfg: TrainConfig
    base: Optimizer
    model: nn.Module
    loss_fn: Any
    fisher_data: Any
    steps_per_epoch: int
    total_steps: int

    def sam_kwargs(self) -> dict[str, Any]:
        """The arguments every SAM-family optimizer takes from the config."""
        cfg = self.cfg
        return dict(
            rho=cfg.rho,
            adaptive=cfg.is_adaptive(),
            eta=cfg.eta,
            eps=cfg.eps,
            model=self.model,
            ascent=cfg.ascent,
            max_grad_norm=cfg.clip,
        )

    def mask(self) -> Any:
        """The mask source named by ``--mask``."""
        return MASKS[self.cfg.mask].build(self)


@dataclass(frozen=True)
class OptimizerSpec:
    """One ``--opt`` value.

    Attributes:
        name: the ``--opt`` value (and the method name when ``uses_mask`` is False).
        label: the report's name for it.
        help: a few words for ``--help``.
        build: returns the optimizer to step; ``None`` means the base optimizer itself (plain SGD/AdamW).
        owns: config keys that only matter for this optimizer (the report ignores them for other methods).
        uses_mask: the optimizer takes a mask source (``--mask``); its methods are ``<name>-<mask short>``.
        adaptive: ``--adaptive`` defaults to on.
        check: cross-field validation of a config with this optimizer (raise ConfigError).
    """

    name: str
    label: str
    help: str
    build: Callable[[BuildContext], Optimizer] | None
    owns: frozenset[str] = frozenset()
    uses_mask: bool = False
    adaptive: bool = False
    check: Callable[[TrainConfig], None] | None = None


@dataclass(frozen=True)
class MaskSpec:
    """One ``--mask`` value (an SSAM mask source).

    Attributes:
        name: the ``--mask`` value.
        short: the method-name suffix (``ssam-<short>``); unique.
        label: the report's suffix (``SSAM-<label>``).
        help: a few words for ``--help``.
        build: returns the mask source.
        owns: config keys that only matter for this mask source.
        sparse: the mask depends on ``--sparsity`` (sweeps vary it, run names show it).
        check: cross-field validation of a config with this mask (raise ConfigError).
    """

    name: str
    short: str
    label: str
    help: str
    build: Callable[[BuildContext], Any]
    owns: frozenset[str] = frozenset()
    sparse: bool = True
    check: Callable[[TrainConfig], None] | None = None


# ------------------------------------------------------------------------------------------ builders
def _period(ctx: BuildContext) -> dict[str, Any]:
    every = ctx.cfg.mask_update_epochs or None
    return {"update_every_epochs": every, "steps_per_epoch": ctx.steps_per_epoch if every else None}


def _selection(cfg: TrainConfig) -> tuple[float | None, dict[str, Any]]:
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
    from ..masks import FisherMask

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
    from ..masks import RandomMask

    sparsity, selection = _selection(ctx.cfg)
    return RandomMask(sparsity, seed=ctx.cfg.seed, **selection, **_period(ctx))


def _dynamic(ctx: BuildContext) -> Any:
    from ..masks import DynamicMask

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
    from ..masks import NormLayersMask

    return NormLayersMask()


def _schedule_kwargs(ctx: BuildContext) -> dict[str, Any]:
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


def _sam(ctx: BuildContext) -> Optimizer:
    from ..optim.sam import SAM
    from ..optim.schedule import ScheduledSAM

    sched = _schedule_kwargs(ctx)
    return ScheduledSAM(ctx.base, **sched, **ctx.sam_kwargs()) if sched else SAM(ctx.base, **ctx.sam_kwargs())


def _ssam_kwargs(ctx: BuildContext) -> dict[str, Any]:
    cfg = ctx.cfg
    mask = ctx.mask()
    data = ctx.fisher_data if getattr(mask, "needs_data", False) else None
    return dict(
        mask=mask,
        norm=cfg.norm,
        loss_fn=ctx.loss_fn,
        data=data,
        form=cfg.form,
        sparse_ascent=cfg.sparse_ascent,
        implicit_layers=cfg.implicit_layers,
        **ctx.sam_kwargs(),
    )


def _ssam(ctx: BuildContext) -> Optimizer:
    from ..optim.schedule import ScheduledSSAM
    from ..optim.ssam import SSAM

    sched = _schedule_kwargs(ctx)
    return ScheduledSSAM(ctx.base, **sched, **_ssam_kwargs(ctx)) if sched else SSAM(ctx.base, **_ssam_kwargs(ctx))


def _looksam(ctx: BuildContext) -> Optimizer:
    from ..optim.looksam import LookSAM

    sched = _schedule_kwargs(ctx)
    sched.pop("every", None)
    return LookSAM(
        ctx.base,
        k=ctx.cfg.look_k,
        alpha=ctx.cfg.look_alpha,
        per_tensor=ctx.cfg.look_per_tensor,
        **sched,
        **ctx.sam_kwargs(),
    )


def _lookssam(ctx: BuildContext) -> Optimizer:
    from ..optim.looksam import LookSSAM

    sched = _schedule_kwargs(ctx)
    sched.pop("every", None)
    return LookSSAM(
        ctx.base,
        k=ctx.cfg.look_k,
        alpha=ctx.cfg.look_alpha,
        per_tensor=ctx.cfg.look_per_tensor,
        **sched,
        **_ssam_kwargs(ctx),
    )


def _esam(ctx: BuildContext) -> Optimizer:
    from ..optim.esam import ESAM

    cfg = ctx.cfg
    return ESAM(
        ctx.base, beta=cfg.esam_beta, gamma=cfg.esam_gamma, seed=cfg.seed, **_schedule_kwargs(ctx), **ctx.sam_kwargs()
    )


def _msam_kwargs(ctx: BuildContext) -> dict[str, Any]:
    """SAM's arguments less those MSAM has no use for (no ascent pass: no ASAM, no ``--ascent``)."""
    kwargs = ctx.sam_kwargs()
    for key in ("adaptive", "eta", "ascent"):
        kwargs.pop(key, None)
    return kwargs


def _msam(ctx: BuildContext) -> Optimizer:
    from ..optim.msam import MSAM

    return MSAM(ctx.base, **_msam_kwargs(ctx))


def _smsam(ctx: BuildContext) -> Optimizer:
    from ..optim.msam import SparseMSAM

    cfg = ctx.cfg
    mask = ctx.mask()
    data = ctx.fisher_data if getattr(mask, "needs_data", False) else None
    return SparseMSAM(
        ctx.base,
        mask=mask,
        norm=cfg.norm,
        loss_fn=ctx.loss_fn,
        data=data,
        batch_size=cfg.batch_size,
        **_msam_kwargs(ctx),
    )


# ------------------------------------------------------------------------------------------ checks
def _check_unstructured_only(what: str) -> Callable[[TrainConfig], None]:
    def check(cfg: TrainConfig) -> None:
        if cfg.pattern != "unstructured":
            raise ConfigError(f"--mask {cfg.mask} {what}, got --pattern {cfg.pattern}")

    return check


def _check_dynamic(cfg: TrainConfig) -> None:
    _check_unstructured_only("supports only --pattern unstructured")(cfg)
    if cfg.mask_update_epochs == 0:
        raise ConfigError("--mask dynamic needs --mask-update-epochs >= 1 (it is a schedule of mask updates), got 0")


def _check_ssam(cfg: TrainConfig) -> None:
    if cfg.sparse_ascent and cfg.norm != "masked":
        raise ConfigError(
            "--sparse-ascent needs --norm masked: with the full-gradient norm the ascent pass needs every gradient"
        )
    if cfg.sparse_ascent and cfg.form != "explicit":
        raise ConfigError("--sparse-ascent needs --form explicit: the implicit form perturbs densely")


def _check_sgd(cfg: TrainConfig) -> None:
    if cfg.adaptive:
        sam_family = "/".join(n for n, o in OPTIMIZERS.items() if "adaptive" in o.owns)
        raise ConfigError(f"--adaptive applies to {sam_family}, got --opt {cfg.opt}")
    if is_scheduled(cfg):
        raise ConfigError(
            f"--sam-every/--sam-start/--rho-ramp/--ascent-fraction apply to SAM-family optimizers, got --opt {cfg.opt}"
        )


def is_scheduled(values: Any) -> bool:
    """Is a time schedule or a sub-batch ascent asked for (``--sam-every`` > 1, ``--sam-start`` > 0,
    ``--rho-ramp`` > 0 or ``--ascent-fraction`` < 1)?"""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    return (
        get("sam_every", 1) != 1
        or get("sam_start", 0.0) != 0.0
        or get("rho_ramp", 0.0) != 0.0
        or get("ascent_fraction", 1.0) != 1.0
    )


def variant_tag(values: Any) -> str:
    """The run-name suffix of a time schedule or sub-batch ascent (``-every2-start0.75``), "" without."""
    if not is_scheduled(values):
        return ""
    get = values.get if isinstance(values, dict) else lambda k, d=None: getattr(values, k, d)
    parts = [
        ("every", get("sam_every", 1), 1),
        ("start", get("sam_start", 0.0), 0.0),
        ("ramp", get("rho_ramp", 0.0), 0.0),
        ("asc", get("ascent_fraction", 1.0), 1.0),
    ]
    return "".join(f"-{name}{value:g}" for name, value, default in parts if value != default)


def _check_looksam(cfg: TrainConfig) -> None:
    if cfg.sam_every != 1:
        raise ConfigError(
            f"--opt {cfg.opt} runs SAM every --look-k {cfg.look_k} steps; --sam-every {cfg.sam_every} "
            "contradicts it (leave --sam-every at 1)"
        )


def _check_lookssam(cfg: TrainConfig) -> None:
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


def _check_esam(cfg: TrainConfig) -> None:
    if cfg.esam_gamma < 1 and cfg.ascent_fraction < 1:
        raise ConfigError(
            f"--esam-gamma {cfg.esam_gamma} (data selection) compares every sample's loss at w and w + e, "
            f"so pass 1 needs the whole batch; --ascent-fraction {cfg.ascent_fraction} leaves part out: "
            "set one of them to 1"
        )


def _check_msam(cfg: TrainConfig) -> None:
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


def _check_asam(cfg: TrainConfig) -> None:
    if cfg.adaptive is False:
        raise ConfigError("--opt asam is adaptive SAM; --no-adaptive contradicts it (use --opt sam)")


# ------------------------------------------------------------------------------------------ the registry
#: settings of every SAM-family optimizer
SAM_KEYS = frozenset(
    {"rho", "adaptive", "eta", "eps", "asam_rule", "ascent", "sam_every", "sam_start", "rho_ramp", "ascent_fraction"}
)
_SSAM_KEYS = frozenset({"mask", "form", "norm", "sparse_ascent", "implicit_layers"})
#: settings of MSAM (one pass: no ASAM, no ascent, no schedule)
_MSAM_KEYS = frozenset({"rho", "eps"}) & SAM_KEYS | {"rho"}
_SELECTION_KEYS = frozenset(
    {"sparsity", "pattern", "granularity", "nm", "budget", "fill", "mask_update_epochs", "mask_timing"}
)

#: ``--opt`` values, in report order.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        OptimizerSpec("sgd", "SGD", "sgd (base only)", None, check=_check_sgd),
        OptimizerSpec("sam", "SAM", "sam", _sam, owns=SAM_KEYS),
        OptimizerSpec("asam", "ASAM", "asam (adaptive SAM)", _sam, owns=SAM_KEYS, adaptive=True, check=_check_asam),
        OptimizerSpec(
            "ssam", "SSAM", "ssam (sparse SAM)", _ssam, uses_mask=True, check=_check_ssam, owns=SAM_KEYS | _SSAM_KEYS
        ),
        OptimizerSpec(
            "looksam",
            "LookSAM",
            "looksam (SAM every --look-k steps, g_v reused)",
            _looksam,
            check=_check_looksam,
            owns=SAM_KEYS | {"look_k", "look_alpha", "look_per_tensor"},
        ),
        OptimizerSpec(
            "lookssam",
            "LookSSAM",
            "lookssam (LookSAM with SSAM's --mask)",
            _lookssam,
            uses_mask=True,
            check=_check_lookssam,
            owns=SAM_KEYS | _SSAM_KEYS | {"look_k", "look_alpha", "look_per_tensor"},
        ),
        OptimizerSpec(
            "esam",
            "ESAM",
            "esam (random weight subsets, data selection)",
            _esam,
            check=_check_esam,
            owns=SAM_KEYS | {"esam_beta", "esam_gamma"},
        ),
        OptimizerSpec(
            "msam",
            "MSAM",
            "msam (Momentum-SAM: one pass, perturbed along the momentum)",
            _msam,
            check=_check_msam,
            owns=_MSAM_KEYS,
        ),
        OptimizerSpec(
            "smsam",
            "SMSAM",
            "smsam (sparse MSAM, with SSAM's --mask)",
            _smsam,
            uses_mask=True,
            check=_check_msam,
            owns=_MSAM_KEYS | {"mask", "norm"},
        ),
    )
}

#: ``--mask`` values (SSAM mask sources), in report order.
MASKS: dict[str, MaskSpec] = {
    s.name: s
    for s in (
        MaskSpec(
            "fisher",
            "f",
            "F",
            "fisher (SSAM-F)",
            _fisher,
            owns=_SELECTION_KEYS | {"num_samples", "true_fisher", "fisher_bn_stats", "fisher_augment"},
        ),
        MaskSpec(
            "dynamic",
            "d",
            "D",
            "dynamic (SSAM-D)",
            _dynamic,
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
        MaskSpec("random", "r", "R", "random", _random, owns=_SELECTION_KEYS),
        MaskSpec(
            "norm",
            "n",
            "N (norm layers)",
            "norm (normalisation layers only, SAM-ON)",
            _norm,
            sparse=False,
            check=_check_unstructured_only("has no pattern (it perturbs whole normalisation layers)"),
        ),
    )
}


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
    """The report's label of a config: ``SGD``, ``SAM``, ``SSAM-F``, ``SSAM-N (norm layers)``, ..."""
    opt, mask = _parts(values)
    if opt is None:
        return method_name(values).upper()
    return opt.label if mask is None else f"{opt.label}-{mask.label}"


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


def check(cfg: TrainConfig) -> None:
    """The optimizer's and the mask's own cross-field checks."""
    opt, mask = _parts(cfg)
    for spec in (opt, mask):
        if spec is not None and spec.check is not None:
            spec.check(cfg)


def build_optimizer(ctx: BuildContext) -> Optimizer:
    """The optimizer ``ctx.cfg`` names (the base optimizer itself for ``--opt sgd``)."""
    spec = OPTIMIZERS[ctx.cfg.opt]
    return ctx.base if spec.build is None else spec.build(ctx)


__all__ = [
    "MASKS",
    "METHODS",
    "OPTIMIZERS",
    "SPARSE_METHODS",
    "BuildContext",
    "MaskSpec",
    "OptimizerSpec",
    "build_optimizer",
    "check",
    "is_scheduled",
    "is_sparse",
    "variant_tag",
    "method_label",
    "method_name",
    "method_order",
    "method_values",
    "relevant",
]
