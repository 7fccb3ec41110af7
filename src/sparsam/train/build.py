"""Optimizers, mask sources and the LR schedule, built from a :class:`TrainConfig`.

``METHODS`` is the registry of method names the sweep, the demo, the report and the tests use:
each is a set of config values (``ssam-f`` = ``--opt ssam --mask fisher``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from .config import TrainConfig
from .errors import ConfigError

#: method name -> config values. The label a run gets is :attr:`TrainConfig.method`.
METHODS: dict[str, dict[str, Any]] = {
    "sgd": {"opt": "sgd"},
    "sam": {"opt": "sam"},
    "asam": {"opt": "asam"},
    "ssam-f": {"opt": "ssam", "mask": "fisher"},
    "ssam-d": {"opt": "ssam", "mask": "dynamic"},
    "ssam-r": {"opt": "ssam", "mask": "random"},
    "ssam-n": {"opt": "ssam", "mask": "norm"},
}

#: methods whose runs depend on --sparsity
SPARSE_METHODS = ("ssam-f", "ssam-d", "ssam-r")


def method_values(name: str) -> dict[str, Any]:
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    return dict(METHODS[name])


def build_mask(cfg: TrainConfig, *, steps_per_epoch: int, total_steps: int) -> Any:
    """The SSAM mask source for ``cfg`` (``--mask``, ``--pattern``, ``--mask-update-epochs``, ...)."""
    from .. import masks

    every = cfg.mask_update_epochs or None
    period: dict[str, Any] = {"update_every_epochs": every, "steps_per_epoch": steps_per_epoch if every else None}
    if cfg.pattern == "nm":
        n, m = cfg.nm_pair()
        sparsity, pattern = None, f"{n}:{m}"
    else:
        sparsity, pattern = cfg.sparsity, cfg.pattern
    selection: dict[str, Any] = {"pattern": pattern, "granularity": cfg.granularity, "budget": cfg.budget}
    if cfg.mask == "random":
        return masks.RandomMask(sparsity, seed=cfg.seed, **selection, **period)
    if cfg.mask == "fisher":
        return masks.FisherMask(
            sparsity, cfg.num_samples, true_fisher=cfg.true_fisher, bn_stats=cfg.fisher_bn_stats, seed=cfg.seed,
            **selection, **period,
        )
    if cfg.mask == "dynamic":
        return masks.DynamicMask(
            cfg.sparsity, total_steps, alpha=cfg.dynamic_alpha, grow=cfg.grow, budget=cfg.budget, seed=cfg.seed,
            **period,
        )
    if cfg.mask == "norm":
        return masks.NormLayersMask()
    raise ConfigError(f"--mask must be one of fisher, dynamic, random, norm, got {cfg.mask!r}")


def build_optimizer(
    cfg: TrainConfig,
    params: Iterable[nn.Parameter],
    *,
    model: nn.Module,
    loss_fn: Any,
    fisher_data: Any,
    steps_per_epoch: int,
    total_steps: int,
) -> tuple[Optimizer, Optimizer]:
    """(optimizer to step, base optimizer that the LR scheduler drives).

    ``model`` is what SAM/SSAM use for BatchNorm (clean-pass statistics), DDP ``no_sync`` and
    parameter names: the DDP wrapper when there is one, never the ``torch.compile`` wrapper.
    For plain SGD both are the same object. Gradient clipping of SAM/SSAM is done by the
    optimizer (``max_grad_norm``, on the descent gradient); for SGD by the engine.
    """
    from .. import SAM, SSAM

    params = list(params)
    if cfg.base == "sgd":
        base: Optimizer = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    else:
        base = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.opt == "sgd":
        return base, base
    sam_kwargs: dict[str, Any] = dict(
        rho=cfg.rho, adaptive=cfg.is_adaptive(), eta=cfg.eta, model=model, ascent=cfg.ascent, max_grad_norm=cfg.clip
    )
    if cfg.opt in ("sam", "asam"):
        return SAM(base, **sam_kwargs), base
    mask = build_mask(cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    accepted = inspect.signature(SSAM.__init__).parameters
    extra: dict[str, Any] = {}
    if "form" in accepted:
        extra["form"] = cfg.form
    elif cfg.form != "explicit":
        raise ConfigError(f"--form {cfg.form} is not available in this version of sparsam (SSAM has no form= argument)")
    if cfg.sparse_ascent is not None:
        if "sparse_ascent" not in accepted:
            raise ConfigError("--sparse-ascent is not available in this version of sparsam")
        extra["sparse_ascent"] = cfg.sparse_ascent
    data = fisher_data if getattr(mask, "needs_data", False) else None
    return SSAM(base, mask=mask, norm=cfg.norm, loss_fn=loss_fn, data=data, **extra, **sam_kwargs), base


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up over ``warmup_steps`` (from 1/warmup to 1),
    then cosine from 1 down to ``min_ratio`` at ``total_steps`` (``constant``: stays 1).

    A callable object rather than a lambda, so ``LambdaLR.state_dict()`` records its settings.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float, schedule: str) -> None:
        self.total_steps, self.warmup_steps, self.min_ratio, self.schedule = total_steps, warmup_steps, min_ratio, schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(cfg: TrainConfig, base: Optimizer, *, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule on the base optimizer (SAM shares its param_groups, so the LR it uses is
    the one set here). Step it once after every optimizer step."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(base, WarmupCosine(total, warmup, cfg.min_lr / cfg.lr, cfg.schedule))
