"""SSAM-D: a dynamic-sparse-training mask (drop by small gradient, grow at random).

Mi et al., NeurIPS 2022 (arXiv 2210.05177), Sec. 3.3; TPAMI version arXiv 2306.17504.

    init:    a uniformly random mask with exactly round((1 - s) N) perturbed coordinates
    update:  dr(t) = alpha * (1 + cos(pi * t / T)) / 2              (t = completed steps, T = total_steps)
             n    = min(round(dr * live), inactive)                  (live = perturbed before this update)
             drop the n live coordinates with the smallest drop score: |g| (drop="gradient",
                  default; g = ctx.grads, the mini-batch gradient at w), |w| (drop="weight") or a
                  uniform random number (drop="random")
             grow n coordinates that were inactive before the update, those with the largest grow
                  score: a uniform random number (grow="random", default), |g| (grow="gradient")
                  or |w| (grow="weight")

These are the strategies of the authors' ``--drop_strategy`` / ``--growth_strategy`` (argparse
defaults ``gradient`` / ``random``, NeurIPS 2022 release ``configs/defaulf_cfg.py``).

With ``counts="exact"`` (default) the number of perturbed coordinates is conserved exactly: we
round once and move as many as we drop. ``counts="nominal"`` counts as the authors' code
(NeurIPS 2022 release, ``solver/sam.py``, ``SSAMD``), from the nominal live count
``L = N - N s`` (a float) of the group: ``init`` keeps ``N - ceil(N s)`` coordinates, and an update
keeps the ``int(L (1 - dr))`` live coordinates with the largest drop score (at most the live count)
and grows ``int(min(L dr, N s))`` inactive ones. Both are truncations, so after an update the count
is ``int(L (1 - dr)) + int(L dr)``, one short of ``L`` whenever ``L dr`` is not a whole number; it
does not accumulate, since each update counts from ``L`` again. With
``budget="global"`` (default, as the authors) drop and grow run over one flat ranking of every
parameter, so coordinates may move between layers; with ``budget="layer"`` each tensor keeps its
own count. For ``t >= T`` the drop rate is 0 (``t`` is clamped to ``T``). A parameter without a
gradient counts as ``|g| = 0`` (dropped first, grown last under ``"gradient"``). Ties: lower flat
index first. Because grown coordinates are taken from those inactive *before* the update, a
coordinate dropped now is never re-grown in the same update; ``n`` is capped by the number of
inactive coordinates (relevant only when ``s < alpha * (1 - s)``).

Timing (``timing``, see ``sparsam.masks.base``): ``"before-step"`` (default) updates at the
start of steps ``P, 2P, ...`` and the new mask serves that step. ``"after-step"`` is the authors':
they update at steps ``0, P, 2P, ...`` (epoch ``e % update_freq == 0``, batch 0; step 0 included,
with ``dr(0) = alpha``) from that step's gradient, *after* the step's perturbation was made with
the old mask, so the new mask serves from the next step on. Here the new mask is computed at those
steps and handed to the optimizer at the start of the next one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _sharded
from .base import MaskContext, SeededSource, check_sparsity
from .selection import BUDGETS, select, top_positions

GROW = ("random", "gradient", "weight")
DROP = ("gradient", "weight", "random")
COUNTS = ("exact", "nominal")


def nominal_counts(numel: int, sparsity: float, drop_rate: float) -> tuple[int, int]:
    """The authors' SSAM-D counts of one update over ``numel`` coordinates: ``(keep, grow)`` =
    ``(int(L (1 - dr)), int(min(L dr, N s)))`` with the nominal live count ``L = N - N s``,
    evaluated in the same floating-point order as their code."""
    live = numel - numel * sparsity
    return int(live * (1 - drop_rate)), int(min(live * drop_rate, numel * sparsity))


def cosine_drop_rate(step: int, total_steps: int, alpha: float = 0.5) -> float:
    """``alpha * (1 + cos(pi * min(step, T) / T)) / 2``: alpha at step 0, 0 from step T on."""
    t = min(max(int(step), 0), int(total_steps))
    return float(alpha) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def _flat(tensors: list[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


class DynamicMask(SeededSource):
    """SSAM-D: random initial mask, then cosine-scheduled drop and grow.

    Args:
        sparsity: fraction NOT perturbed, in ``[0, 1)``.
        total_steps: ``T`` of the cosine schedule (usually the length of training in steps; the
            authors use the number of epochs with an epoch clock, the same curve).
        alpha: initial drop rate, in ``[0, 1]`` (the authors' ``--drop_rate``, default 0.5).
        drop: ``"gradient"`` (default, the authors' default: smallest ``|g|``), ``"weight"``
            (smallest ``|w|``) or ``"random"``.
        grow: ``"random"`` (default, the authors' default), ``"gradient"`` (largest ``|g|``) or
            ``"weight"`` (largest ``|w|``).
        budget: ``"global"`` (default) or ``"layer"``: scope of the initial budget and of drop/grow.
        update_every / update_every_epochs + steps_per_epoch: the update period T_m (required; the
            authors' argparse default is 5 epochs).
        timing: ``"before-step"`` (default) or ``"after-step"`` (the authors'), see the module
            docstring.
        counts: ``"exact"`` (default) or ``"nominal"`` (the authors' counts), see the module
            docstring. Not supported on parameters sharded by FSDP2.
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
        drop: str = "gradient",
        grow: str = "random",
        budget: str = "global",
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        timing: str = "before-step",
        counts: str = "exact",
        seed: int = 0,
    ) -> None:
        super().__init__(
            check_sparsity(sparsity, allow_one=False),
            update_every=update_every,
            update_every_epochs=update_every_epochs,
            steps_per_epoch=steps_per_epoch,
            timing=timing,
        )
        if self.update_every is None:
            raise ValueError("DynamicMask needs an update period: give update_every or update_every_epochs")
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if drop not in DROP:
            raise ValueError(f"drop must be one of {DROP}, got {drop!r}")
        if grow not in GROW:
            raise ValueError(f"grow must be one of {GROW}, got {grow!r}")
        if budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {budget!r}")
        self.total_steps, self.alpha, self.budget = total_steps, float(alpha), budget
        if counts not in COUNTS:
            raise ValueError(f"counts must be one of {COUNTS}, got {counts!r}")
        self.drop, self.grow, self.counts = drop, grow, counts
        self._pending: dict[str, Tensor] | None = None  # timing="after-step": the mask for the next step
        self._seed(seed)

    def drop_rate(self, step: int) -> float:
        return cosine_drop_rate(step, self.total_steps, self.alpha)

    def wants_update(self, step: int) -> bool:
        if self.timing == "after-step":
            period = int(self.update_every or 1)
            return step > 0 and (step % period == 0 or (step - 1) % period == 0)
        return super().wants_update(step)

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        sharded = _sharded.sharded_draw(ctx.params, self.generator)  # FSDP2: this rank's rows only
        scores = (
            sharded
            if sharded is not None
            else {n: torch.rand(p.shape, generator=self.generator) for n, p in ctx.params.items()}
        )
        if sharded is not None and self.counts != "exact":
            raise ValueError("DynamicMask(counts='nominal') is not supported on parameters sharded by FSDP2")
        if self.counts == "nominal":
            masks = self._nominal_init(scores)
        else:
            masks = select(scores, self.sparsity, "unstructured", budget=self.budget, one_d="rank")
        if sharded is not None:
            if self.timing == "after-step":
                self._pending = self._next(ctx, masks)
            return masks
        first = {n: m.to(ctx.params[n].device) for n, m in masks.items()}
        if self.timing == "after-step":  # the authors also update at step 0, for step 1 on
            self._pending = self._next(ctx, first)
        return first

    def _nominal_init(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The authors' first mask: the ``N - ceil(N s)`` largest random scores of each group."""
        names = list(scores)
        groups = [names] if self.budget == "global" else [[n] for n in names]
        out: dict[str, Tensor] = {}
        for group in groups:
            flat = _flat([scores[n] for n in group], torch.device("cpu"), torch.float32)
            keep = top_positions(flat, flat.numel() - math.ceil(flat.numel() * self.sparsity))
            i = 0
            for n in group:
                out[n] = keep[i : i + scores[n].numel()].reshape(scores[n].shape)
                i += scores[n].numel()
        return out

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        if self.timing == "before-step":
            return self._next(ctx, ctx.masks)
        handed, self._pending = self._pending, None
        current = handed if handed is not None else ctx.masks
        if ctx.step % int(self.update_every or 1) == 0:
            self._pending = self._next(ctx, current)
        return handed

    def _scores(
        self, kind: str, params: list[Tensor], grads: list[Tensor | None], device: torch.device, index: Tensor
    ) -> Tensor:
        """Scores of the flat positions ``index`` of the group: |g|, |w| or uniform random."""
        if kind == "random":
            return torch.rand(index.numel(), generator=self.generator).to(device)
        if kind == "weight":
            dtype = params[0].dtype if params[0].dtype.is_floating_point else torch.float32
            return _flat([p.detach().abs() for p in params], device, dtype)[index]
        gdtype = next((g.dtype for g in grads if g is not None), torch.float32)
        absg = _flat(
            [g.abs() if g is not None else torch.zeros(p.shape, dtype=gdtype) for g, p in zip(grads, params)],
            device,
            gdtype if gdtype.is_floating_point else torch.float32,
        )
        return absg[index]

    def _next(self, ctx: MaskContext, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if any(map(_sharded.is_sharded, ctx.params.values())):
            if self.counts != "exact":
                raise ValueError("DynamicMask(counts='nominal') is not supported on parameters sharded by FSDP2")
            return self._next_sharded(ctx, masks)
        names = list(ctx.params)
        groups = [names] if self.budget == "global" else [[n] for n in names]
        rate = self.drop_rate(ctx.step)
        out: dict[str, Tensor] = {}
        for group in groups:
            params = [ctx.params[n] for n in group]
            devices = {p.device for p in params}
            device = devices.pop() if len(devices) == 1 else torch.device("cpu")
            live = _flat(
                [masks[n] if n in masks else torch.zeros(ctx.params[n].shape, dtype=torch.bool) for n in group],
                device,
                torch.bool,
            )
            grads = [ctx.grads.get(n) for n in group]
            new = live.clone()
            live_idx = torch.nonzero(live).flatten()
            dead_idx = torch.nonzero(~live).flatten()
            if self.counts == "nominal":
                keep, n_grow = nominal_counts(live.numel(), self.sparsity, rate)
                n_drop = max(live_idx.numel() - keep, 0)
                n_grow = min(n_grow, dead_idx.numel())
            else:
                n_drop = n_grow = min(round(rate * live_idx.numel()), dead_idx.numel())
            if n_drop > 0 or n_grow > 0:
                # Scores are drawn drop first, then grow, as before the counts option existed.
                drop_scores = self._scores(self.drop, params, grads, device, live_idx)
                drop = live_idx[top_positions(drop_scores, n_drop, largest=False)]
                grow_scores = self._scores(self.grow, params, grads, device, dead_idx)
                grown = dead_idx[top_positions(grow_scores, n_grow, largest=True)]
                new[drop] = False
                new[grown] = True
            i = 0
            for n, p in zip(group, params):
                out[n] = new[i : i + p.numel()].reshape(p.shape).to(p.device)
                i += p.numel()
        return out

    def _next_sharded(self, ctx: MaskContext, masks: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``_next`` on parameters sharded by FSDP2: the same drop and grow as one process, chosen
        with the distributed threshold over this rank's shards (``sparsam._sharded``).
        Random scores are drawn for the whole group in one-process order and each rank keeps the
        numbers of its own candidates; gradients and weights are this rank's shards."""
        names = list(ctx.params)
        params = [ctx.params[n] for n in names]
        for n, p in zip(names, params):
            if not _sharded.is_sharded(p):
                raise ValueError(f"DynamicMask got the plain parameter {n!r} next to sharded (FSDP2) ones")
            _sharded.check_layout(p, f"parameter {n!r}")
        comm = _sharded.Comm.of(params[0])
        groups = [0] * len(names) if self.budget == "global" else list(range(len(names)))
        n_groups = max(groups) + 1 if groups else 0
        live = [self._local_mask(masks.get(n), p).reshape(-1) for n, p in zip(names, params)]
        counts = torch.tensor([[int(m.sum()), m.numel()] for m in live], dtype=torch.int64).reshape(-1, 2)
        every = comm.all_gather(counts)  # [world, S, (live, local numel)]
        live_total, numel = [0] * n_groups, [0] * n_groups
        for i, g in enumerate(groups):
            live_total[g] += int(every[:, i, 0].sum())
            numel[g] += int(every[:, i, 1].sum())
        rate = self.drop_rate(ctx.step)
        n_move = [min(round(rate * live_total[g]), numel[g] - live_total[g]) for g in range(n_groups)]
        if not any(k > 0 for k in n_move):
            return {
                n: _sharded.shard_like(m.reshape(_sharded.local(p).shape), p) for n, p, m in zip(names, params, live)
            }
        grads = [ctx.grads.get(n) for n in names]
        cands = {
            "drop": [torch.nonzero(m).flatten() for m in live],
            "grow": [torch.nonzero(~m).flatten() for m in live],
        }
        # per (segment, rank) candidate counts: dead = local numel - live
        n_cand = {"drop": every[:, :, 0], "grow": every[:, :, 1] - every[:, :, 0]}
        vals: dict[str, dict[int, Tensor]] = {"drop": {}, "grow": {}}  # segment -> its candidates' scores
        for g in range(n_groups):  # one process draws group by group, drop scores before grow scores
            members = [i for i, gi in enumerate(groups) if gi == g]
            for what, kind in (("drop", self.drop), ("grow", self.grow)):
                if n_move[g] <= 0:
                    for i in members:  # k = 0: nothing is taken, the values do not matter
                        vals[what][i] = torch.zeros(cands[what][i].numel())
                    continue
                for i, v in zip(
                    members, self._sharded_scores(kind, members, params, grads, cands[what], n_cand[what], comm)
                ):
                    vals[what][i] = v
        drop = _sharded.sharded_top([vals["drop"][i] for i in range(len(names))], groups, n_move, comm, largest=False)
        grow = _sharded.sharded_top([vals["grow"][i] for i in range(len(names))], groups, n_move, comm, largest=True)
        out = {}
        for i, (n, p) in enumerate(zip(names, params)):
            new = live[i].clone()
            new[cands["drop"][i][drop[i]]] = False
            new[cands["grow"][i][grow[i]]] = True
            out[n] = _sharded.shard_like(new.reshape(_sharded.local(p).shape), p)
        return out

    def _sharded_scores(
        self,
        kind: str,
        members: list[int],
        params: list[Tensor],
        grads: list[Tensor | None],
        cands: list[Tensor],
        n_cand: Tensor,
        comm: Any,
    ) -> list[Tensor]:
        """This rank's scores of its candidates in each member segment of one group."""
        if kind == "random":
            # the group's numbers in one-process order: segment by segment, rank by rank
            drawn = torch.rand(int(n_cand[:, members].sum()), generator=self.generator)
            out, start = [], 0
            for i in members:
                mine = start + int(n_cand[: comm.rank, i].sum())
                out.append(drawn[mine : mine + int(n_cand[comm.rank, i])].to(_sharded.local(params[i]).device))
                start += int(n_cand[:, i].sum())
            return out
        if kind == "weight":
            first = params[members[0]]
            dtype = first.dtype if first.dtype.is_floating_point else torch.float32
            return [_sharded.local(params[i]).reshape(-1).abs().to(dtype)[cands[i]] for i in members]
        gdtype = next((g.dtype for g in (grads[i] for i in members) if g is not None), torch.float32)
        gdtype = gdtype if gdtype.is_floating_point else torch.float32
        out = []
        for i in members:
            g = grads[i]
            absg = (
                _sharded.local(g).reshape(-1).abs().to(gdtype)
                if g is not None
                else torch.zeros(_sharded.local(params[i]).numel(), dtype=gdtype)
            )
            out.append(absg[cands[i]])
        return out

    @staticmethod
    def _local_mask(m: Tensor | None, p: Tensor) -> Tensor:
        """This rank's part of a mask of ``p``: a sharded mask, one of the full shape or one of the shard's."""
        shard = _sharded.local(p)
        if m is None:
            return torch.zeros(shard.shape, dtype=torch.bool, device=shard.device)
        if _sharded.is_sharded(m):
            return _sharded.local(m).to(torch.bool)
        if m.shape == shard.shape:
            return m.to(shard.device, torch.bool)
        return _sharded.local_part(m, p).to(shard.device, torch.bool)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "total_steps": self.total_steps,
            "alpha": self.alpha,
            "drop": self.drop,
            "grow": self.grow,
            "budget": self.budget,
            "counts": self.counts,
        }

    def state_dict(self) -> dict[str, Any]:
        pending = (
            None
            if self._pending is None
            else {n: m.clone() if _sharded.is_sharded(m) else m.cpu().clone() for n, m in self._pending.items()}
        )
        return {**super().state_dict(), "pending": pending}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        pending = state.get("pending")
        self._pending = None if pending is None else {n: m.to(torch.bool) for n, m in pending.items()}

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, total_steps={self.total_steps}, alpha={self.alpha}, "
            f"drop={self.drop!r}, grow={self.grow!r}, budget={self.budget!r}, counts={self.counts!r}, seed={self.seed}"
        )
