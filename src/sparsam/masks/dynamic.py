"""SSAM-D: a dynamic-sparse-training mask (drop by small gradient, grow at random).

Mi et al., NeurIPS 2022 (arXiv 2210.05177), Sec. 3.3; TPAMI version arXiv 2306.17504.

    init:    a uniformly random mask with exactly round((1 - s) N) perturbed coordinates
    update:  dr(t) = alpha * (1 + cos(pi * t / T)) / 2              (t = completed steps, T = total_steps)
             n    = min(round(dr * live), inactive)                  (live = perturbed before this update)
             drop the n live coordinates with the smallest |g|      (g = ctx.grads, the mini-batch
                                                                     gradient at w)
             grow n coordinates that were inactive before the update, uniformly at random
             (grow="random", default) or with the largest |g| (grow="gradient")

The number of perturbed coordinates is conserved exactly. With ``budget="global"`` (default; the
design note describes one budget over all parameters) drop and grow run over one flat ranking of
every parameter, so coordinates may move between layers; with ``budget="layer"`` each tensor
keeps its own count. For ``t >= T`` the drop rate is 0 (``t`` is clamped to ``T``). A parameter
without a gradient counts as ``|g| = 0`` (dropped first, grown last under ``"gradient"``). Ties:
lower flat index first. Because grown coordinates are taken from those inactive *before* the
update, a coordinate dropped now is never re-grown in the same update; ``n`` is capped by the
number of inactive coordinates (relevant only when ``s < alpha * (1 - s)``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import MaskContext, SeededSource, check_sparsity
from .selection import BUDGETS, select, top_positions

GROW = ("random", "gradient")


def cosine_drop_rate(step: int, total_steps: int, alpha: float = 0.5) -> float:
    """``alpha * (1 + cos(pi * min(step, T) / T)) / 2``: alpha at step 0, 0 from step T on."""
    t = min(max(int(step), 0), int(total_steps))
    return float(alpha) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def _flat(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


class DynamicMask(SeededSource):
    """SSAM-D: random initial mask, then cosine-scheduled drop (small ``|g|``) and grow.

    Args:
        sparsity: fraction NOT perturbed, in ``[0, 1)``.
        total_steps: ``T`` of the cosine schedule (usually the length of training in steps).
        alpha: initial drop rate, in ``[0, 1]`` (the authors: 0.5).
        grow: ``"random"`` (default, the authors') or ``"gradient"`` (largest ``|g|``).
        budget: ``"global"`` (default) or ``"layer"``: scope of the initial budget and of drop/grow.
        update_every / update_every_epochs + steps_per_epoch: the update period T_m (required).
        seed: seeds this source's ``torch.Generator`` (CPU); its state is in ``state_dict``, so a
            resumed run makes the same masks.
    """

    needs_grads = True

    def __init__(
        self,
        sparsity: float,
        total_steps: int,
        *,
        alpha: float = 0.5,
        grow: str = "random",
        budget: str = "global",
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            check_sparsity(sparsity, allow_one=False),
            update_every=update_every,
            update_every_epochs=update_every_epochs,
            steps_per_epoch=steps_per_epoch,
        )
        if self.update_every is None:
            raise ValueError("DynamicMask needs an update period: give update_every or update_every_epochs")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if grow not in GROW:
            raise ValueError(f"grow must be one of {GROW}, got {grow!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.total_steps, self.alpha, self.grow, self.budget = total_steps, float(alpha), grow, budget
        self._seed(seed)

    def drop_rate(self, step: int) -> float:
        return cosine_drop_rate(step, self.total_steps, self.alpha)

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        scores = {n: torch.rand(p.shape, generator=self.generator) for n, p in ctx.params.items()}
        masks = select(scores, self.sparsity, "unstructured", budget=self.budget, one_d="rank")
        return {n: m.to(ctx.params[n].device) for n, m in masks.items()}

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        names = list(ctx.params)
        groups = [names] if self.budget == "global" else [[n] for n in names]
        rate = self.drop_rate(ctx.step)
        out: dict[str, Tensor] = {}
        for group in groups:
            params = [ctx.params[n] for n in group]
            devices = {p.device for p in params}
            device = devices.pop() if len(devices) == 1 else torch.device("cpu")
            live = _flat(
                [ctx.masks[n] if n in ctx.masks else torch.zeros(ctx.params[n].shape, dtype=torch.bool) for n in group],
                device,
                torch.bool,
            )
            grads = [ctx.grads.get(n) for n in group]
            gdtype = next((g.dtype for g in grads if g is not None), torch.float32)
            absg = _flat(
                [g.abs() if g is not None else torch.zeros(p.shape, dtype=gdtype) for g, p in zip(grads, params)],
                device,
                gdtype if gdtype.is_floating_point else torch.float32,
            )
            new = live.clone()
            live_idx = torch.nonzero(live).flatten()
            dead_idx = torch.nonzero(~live).flatten()
            n_move = min(int(round(rate * live_idx.numel())), dead_idx.numel())
            if n_move > 0:
                drop = live_idx[top_positions(absg[live_idx], n_move, largest=False)]
                if self.grow == "random":
                    grow_scores = torch.rand(dead_idx.numel(), generator=self.generator).to(device)
                else:
                    grow_scores = absg[dead_idx]
                grown = dead_idx[top_positions(grow_scores, n_move, largest=True)]
                new[drop] = False
                new[grown] = True
            i = 0
            for n, p in zip(group, params):
                out[n] = new[i : i + p.numel()].reshape(p.shape).to(p.device)
                i += p.numel()
        return out

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, alpha={self.alpha}, "
            f"grow={self.grow!r}, budget={self.budget!r}, seed={self.seed}"
        )
