"""ESAM's stochastic weight perturbation (SWP): a fresh Bernoulli(β) mask at every step.

Du et al., "Efficient Sharpness-aware Minimization for Improved Training of Neural Networks",
ICLR 2022 (arXiv 2110.03141), Section 3.1: each step perturbs a random subset of the weights,
every weight kept with probability β, and the perturbation is scaled by 1/β. The authors' code
(github.com/dydjw9/Efficient_SAM, ``utils/Esam.py``) draws the subset per parameter *tensor*
(``random.random() > beta`` switches a whole tensor's ``requires_grad`` off for the next ascent
pass, which is where the saving comes from); the paper's formula draws per coordinate. Both are
offered (``granularity``); the 1/β scale is applied by [`ESAM`][sparsam.optim.esam.ESAM], not here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .base import MaskContext, SeededSource

GRANULARITIES = ("tensor", "coordinate")


class StochasticMask(SeededSource):
    """A fresh random mask whenever it is asked: every tensor (``granularity="tensor"``, the
    authors' code) or every coordinate (``"coordinate"``, the paper's formula) is perturbed with
    probability ``beta``.

    Draws come from this object's own CPU generator (``seed``; its state is in ``state_dict``, so
    a resumed run draws the same masks), one ``torch.rand`` per parameter in ``ctx.params`` order.
    ``update`` draws a new mask every time it is called; as an SSAM mask source on its own it is
    static (``update_every=None``): [`ESAM`][sparsam.optim.esam.ESAM] redraws it after every
    perturbing step, so that the mask of step t+1 is known before its ascent pass (which then
    skips the gradients of unperturbed tensors, as in the authors' code).

    Args:
        beta: probability that a tensor (or coordinate) is perturbed, in (0, 1]. ``sparsity`` is
            ``1 - beta`` (the expected fraction not perturbed).
        granularity: ``"tensor"`` or ``"coordinate"``.
        seed: seed of the generator.
    """

    def __init__(self, beta: float = 0.6, *, granularity: str = "tensor", seed: int = 0) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or math.isnan(beta) or not 0.0 < beta <= 1.0:
            raise ValueError(f"beta must be a probability in (0, 1] (the fraction of weights perturbed), got {beta!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        super().__init__(1.0 - float(beta))
        self.beta = float(beta)
        self.granularity = granularity
        self._seed(seed)

    def draw_tensors(self, names: Iterable[str]) -> dict[str, bool]:
        """``granularity="tensor"``: which of the named tensors the next draw perturbs, as Python
        bools (no device work, no host synchronisation); advances the generator exactly as
        ``update`` does for the same names."""
        if self.granularity != "tensor":
            raise ValueError(
                f"draw_tensors needs granularity='tensor', this source has granularity={self.granularity!r}"
            )
        return {n: bool(torch.rand((), generator=self.generator) < self.beta) for n in names}

    def _draw(self, ctx: MaskContext) -> dict[str, Tensor]:
        if self.granularity == "tensor":
            keep = self.draw_tensors(ctx.params)
            return {n: torch.full(p.shape, keep[n], dtype=torch.bool, device=p.device) for n, p in ctx.params.items()}
        return {
            n: (torch.rand(p.shape, generator=self.generator) < self.beta).to(p.device) for n, p in ctx.params.items()
        }

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        return self._draw(ctx)

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        return self._draw(ctx)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "beta": self.beta, "granularity": self.granularity}

    def extra_repr(self) -> str:
        return f"beta={self.beta}, granularity={self.granularity!r}, seed={self.seed}"


__all__ = ["GRANULARITIES", "StochasticMask"]
