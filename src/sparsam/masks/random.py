"""Random masks: the simplest baseline (and SSAM's default when only a sparsity is given)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _sharded
from .base import MaskContext, SeededSource, check_sparsity
from .selection import PatternOptions, parse_pattern, resolve_sparsity, select


class RandomMask(PatternOptions, SeededSource):
    """Uniformly random mask: [`select`][sparsam.masks.select] over uniform random scores.

    With the default unstructured pattern and global budget exactly ``round((1 - sparsity) * N)``
    coordinates are perturbed, ``N`` counting every perturbable coordinate. Other patterns
    (``"structured"``, ``"2:4"``, ...) and options are those of [`select`][sparsam.masks.select]
    (``one_d`` defaults to ``"rank"``: 1-D tensors are drawn like the others, also under N:M).
    Scores are drawn on the CPU from this object's generator (``seed``), one ``torch.rand`` per
    parameter in ``ctx.params`` order, so masks do not depend on the device; the generator state is
    in ``state_dict``, so a resumed run draws the same masks. With ``update_every`` set, a fresh
    random mask is drawn at each update. ``sparsity=1.0`` is accepted here (unlike
    [`select`][sparsam.masks.select]) and gives all-false masks: SSAM then equals its base optimizer.

    On parameters sharded by FSDP2 each rank draws the same numbers (one parameter at a time) and
    keeps its own rows; the selection is the distributed one of [`select`][sparsam.masks.select]
    for the unstructured and channel-structured patterns (for per-tensor structured and N:M masks,
    which it cannot always match, every rank draws and selects the full masks instead).
    """

    def __init__(
        self,
        sparsity: float | None,
        *,
        seed: int = 0,
        pattern: str = "unstructured",
        n: int | None = None,
        m: int | None = None,
        granularity: str = "tensor",
        budget: str = "global",
        one_d: str = "rank",
        fill: str = "first-fit",
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.pattern, self.n, self.m = parse_pattern(pattern, n, m)
        if sparsity is not None and self.pattern != "nm" and check_sparsity(sparsity) == 1.0:
            resolved = 1.0  # all-false masks (SSAM = the base optimizer); select() needs s < 1
        else:
            resolved = resolve_sparsity(sparsity, self.pattern, self.n, self.m)
        super().__init__(
            resolved,
            update_every=update_every,
            update_every_epochs=update_every_epochs,
            steps_per_epoch=steps_per_epoch,
        )
        self.granularity, self.budget, self.one_d, self.fill = granularity, budget, one_d, fill
        check = 0.0 if self.sparsity == 1.0 else self.sparsity  # validates the pattern options
        select(
            {}, check, self.pattern, n=self.n, m=self.m, granularity=granularity, budget=budget, one_d=one_d, fill=fill
        )
        self._seed(seed)

    def _draw(self, ctx: MaskContext) -> dict[str, Tensor]:
        if self.sparsity == 1.0:
            return {n: torch.zeros(p.shape, dtype=torch.bool, device=p.device) for n, p in ctx.params.items()}
        sharded = self.pattern == "unstructured" or (self.pattern == "structured" and self.granularity == "channel")
        scores = _sharded.sharded_draw(ctx.params, self.generator) if sharded else None
        if scores is not None:  # FSDP2: this rank's scores; select() chooses with the distributed threshold
            return self._select(scores)
        scores = {n: torch.rand(p.shape, generator=self.generator) for n, p in ctx.params.items()}
        masks = self._select(scores)
        return {n: m.to(ctx.params[n].device) for n, m in masks.items()}

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        return self._draw(ctx)

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        return self._draw(ctx)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self._pattern_settings()}

    def extra_repr(self) -> str:
        pat = self._pattern_name()
        return f"{super().extra_repr()}, seed={self.seed}, pattern={pat!r}"
