"""Random masks: the simplest baseline (and SSAM's default when only a sparsity is given)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import MaskContext, MaskSource


def _global_topk_masks(scores: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    # k = round(density * N), one global ranking (ties cannot matter for continuous random scores).
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).float().cpu() for n in names]) if names else torch.zeros(0)
    k = int(round(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = True
    out, i = {}, 0
    for n in names:
        s = scores[n]
        out[n] = keep[i : i + s.numel()].reshape(s.shape).to(s.device)
        i += s.numel()
    return out


class RandomMask(MaskSource):
    """Uniformly random mask with exactly ``round((1 - sparsity) * N)`` perturbed coordinates.

    ``N`` counts every perturbable coordinate (one global budget). The random state lives in this
    object (``seed``) and in its ``state_dict``, so a resumed run draws the same masks.
    With ``update_every`` set, a fresh random mask is drawn at each update.
    """

    def __init__(
        self,
        sparsity: float,
        *,
        seed: int = 0,
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        super().__init__(
            sparsity,
            update_every=update_every,
            update_every_epochs=update_every_epochs,
            steps_per_epoch=steps_per_epoch,
        )
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def _draw(self, ctx: MaskContext) -> dict[str, Tensor]:
        scores = {n: torch.rand(p.shape, generator=self.generator) for n, p in ctx.params.items()}
        masks = _global_topk_masks(scores, 1.0 - self.sparsity)
        return {n: m.to(ctx.params[n].device) for n, m in masks.items()}

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        return self._draw(ctx)

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        return self._draw(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "seed": self.seed, "rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.seed = int(state["seed"])
        self.generator.set_state(state["rng"])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, seed={self.seed}"
