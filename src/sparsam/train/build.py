"""The optimizer and the LR schedule, built from a [`TrainConfig`][sparsam.train.TrainConfig].

Which optimizer and mask source each ``--opt`` / ``--mask`` value builds is in the registry,
``sparsam.train.methods``; this module adds the base optimizer and the schedule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from . import methods
from .config import TrainConfig


def build_optimizer_and_base(
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
    groups: list[Any] = list(params)  # parameters, or param groups (ASAM's weight-name rule)
    if cfg.asam_rule == "weight-names" and cfg.is_adaptive():
        # The official ASAM rule (sparsam.optim.asam): only parameters named *weight* are scaled.
        from ..optim.asam import asam_param_groups

        ids = {id(p) for p in groups}
        groups = [{**g, "params": [p for p in g["params"] if id(p) in ids]} for g in asam_param_groups(model)]
        groups = [g for g in groups if g["params"]]
    if cfg.base == "sgd":
        base: Optimizer = torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    else:
        base = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]), weight_decay=cfg.weight_decay)
    ctx = methods.BuildContext(
        cfg=cfg,
        base=base,
        model=model,
        loss_fn=loss_fn,
        fisher_data=fisher_data,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    return methods.build_optimizer(ctx), base


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up over ``warmup_steps`` (from 1/warmup to 1),
    then cosine from 1 down to ``min_ratio`` at ``total_steps`` (``constant``: stays 1).

    A callable object rather than a lambda, so ``LambdaLR.state_dict()`` records its settings.
    """

    def __init__(self, total_steps: int, warmup_steps: int, min_ratio: float, schedule: str) -> None:
        self.total_steps, self.warmup_steps, self.min_ratio, self.schedule = (
            total_steps,
            warmup_steps,
            min_ratio,
            schedule,
        )

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class EpochCosine:
    """The authors' per-epoch cosine (SSAM release ``solver/lr_scheduler.py``, stepped with the epoch
    index *after* each epoch in ``train.py``): with ``f(k) = min + (1 - min) (1 + cos(pi (k - W) /
    (E - W))) / 2`` (linear ``k / W`` during a warm-up of ``W`` epochs), epoch 0 runs at the full LR
    and epoch ``e >= 1`` at ``f(e - 1)``: constant within an epoch, one epoch behind the curve.
    A multiplier per optimizer step, for ``LambdaLR``."""

    def __init__(self, steps_per_epoch: int, epochs: int, warmup_epochs: float, min_ratio: float) -> None:
        self.steps_per_epoch, self.epochs = steps_per_epoch, epochs
        self.warmup_epochs, self.min_ratio = warmup_epochs, min_ratio

    def __call__(self, step: int) -> float:
        epoch = step // self.steps_per_epoch
        if epoch == 0:
            return 1.0
        k, w = epoch - 1, self.warmup_epochs
        if k < w:
            return k / w
        t = (k - w) / max(self.epochs - w, 1e-12)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def build_scheduler(cfg: TrainConfig, base: Optimizer, *, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule on the base optimizer (SAM shares its param_groups, so the LR it uses is
    the one set here). Step it once after every optimizer step."""
    total = cfg.epochs * steps_per_epoch
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if cfg.schedule == "cosine-epoch":
        return torch.optim.lr_scheduler.LambdaLR(
            base, EpochCosine(steps_per_epoch, cfg.epochs, cfg.warmup_epochs, cfg.min_lr / cfg.lr)
        )
    return torch.optim.lr_scheduler.LambdaLR(base, WarmupCosine(total, warmup, cfg.min_lr / cfg.lr, cfg.schedule))


__all__ = ["EpochCosine", "WarmupCosine", "build_optimizer_and_base", "build_scheduler"]
