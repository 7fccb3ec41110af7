"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection.

Du, Yan, Feng, Zhou, Zhen, Goh and Tan, "Efficient Sharpness-aware Minimization for Improved
Training of Neural Networks", ICLR 2022 (arXiv 2110.03141), Algorithm 1; the authors' code is
github.com/dydjw9/Efficient_SAM (``utils/Esam.py``). One step, g = ∇L_B(w) on the batch B:

    SWP:  m ~ Bernoulli(β) per tensor (the code; per coordinate in the paper's formula)
          e = (ρ / β) · m ⊙ g / ‖m ⊙ g‖                 (pass 1 computes only the kept tensors' gradients)
    SDS:  ℓᵢ(w + e) − ℓᵢ(w) for every sample i           (a forward-only pass at w + e)
          B⁺ = the ⌊γ·|B|⌋ samples where the loss rose most
          w ← base step on ∇L_{B⁺}(w + e)                (pass 2 on B⁺ only)

Settings from the authors' ``run.sh`` for CIFAR-10/100 ResNet-18: β = 0.6, γ = 0.5, ρ = 0.05,
lr 0.05, weight decay 1e-3, batch 64 per GPU on 2 GPUs. The paper reports ESAM at about 1.4x the
base optimizer's cost (SAM: 2x) with accuracy matching or above SAM's.

Differences from the authors' code, on purpose: ``w`` is restored exactly (exchange or copy) rather than by
subtracting e; B⁺ holds exactly ⌊γ·|B|⌋ samples (the code keeps those strictly above the
⌊γ·|B|⌋-th largest, one fewer when there are no ties); the mask of step t+1 is drawn from a seeded
generator at the end of step t (the code uses Python's ``random``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from ..bn import no_running_stats
from ..masks.base import MaskSource
from ..masks.stochastic import StochasticMask
from .sam import ASCENT, DESCENT, MEASURE, PassKind
from .schedule import ScheduledSSAM
from .ssam import _DENSE, _SKIP

FORWARD_COST = 1.0 / 3.0
"""Cost of a forward-only pass in forward+backward passes (a backward costs about two forwards)."""


class ESAM(ScheduledSSAM):
    """ESAM (Du et al., ICLR 2022), on SSAM's masks: see the module docstring for the rule.

    SWP is a mask source, [`StochasticMask`][sparsam.masks.stochastic.StochasticMask], redrawn
    after every perturbing step, with the perturbation scaled by 1/β and its norm taken over the
    perturbed tensors (``norm="masked"``, as the authors' code, whose unperturbed tensors have no
    ascent gradient); pass 1 skips the weight gradients of unperturbed tensors (SSAM's
    ``sparse_ascent``). Another mask source (``mask=FisherMask(...)``) replaces SWP: ESAM is then
    that SSAM plus data selection.

    Data selection (``gamma < 1``) needs a closure that reports per-sample losses: while
    [`wants_sample_losses`][sparsam.SAM.wants_sample_losses] is true it hands them to
    [`record_sample_losses`][sparsam.SAM.record_sample_losses]; in the forward-only pass
    (``current_pass == "measure"``, run under ``torch.no_grad()``) it records the losses and calls
    no ``backward``; in the descent pass it uses the samples
    [`batch_index`][sparsam.SAM.batch_index]. ``sparsam train`` does this; so can a hand-written
    closure (see docs/variants.md). A closure that records nothing gets a ``RuntimeError``
    naming ``gamma`` (``gamma=1`` runs SWP alone with any closure).

    Args:
        params_or_optimizer, base_optimizer_cls, **kwargs: as [`ScheduledSSAM`][sparsam.optim.schedule.ScheduledSSAM]
            (the time schedule composes; ``ascent_fraction < 1`` only with ``gamma = 1``).
        beta: SWP's probability of perturbing a tensor (default 0.6, the authors' CIFAR setting);
            only without ``mask``.
        gamma: the fraction of the batch that pass 2 uses (default 0.5); 1 turns selection off.
        granularity: SWP per ``"tensor"`` (the authors' code) or per ``"coordinate"`` (the paper).
        seed: seed of SWP's generator.
        mask: another SSAM mask source in place of SWP.
        norm: SSAM's norm (default ``"masked"``, the authors').
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[torch.optim.Optimizer] | None = None,
        *,
        beta: float | None = None,
        gamma: float = 0.5,
        granularity: str = "tensor",
        seed: int = 0,
        mask: MaskSource | None = None,
        norm: str = "masked",
        ascent_fraction: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if mask is not None and beta is not None:
            raise ValueError(
                f"beta={beta!r} is the probability of ESAM's own random mask (SWP); with mask={type(mask).__name__} "
                "the mask source decides what is perturbed: leave beta out"
            )
        if (
            isinstance(gamma, bool)
            or not isinstance(gamma, (int, float))
            or math.isnan(gamma)
            or not 0.0 < gamma <= 1.0
        ):
            raise ValueError(f"gamma must be a fraction in (0, 1] (of the batch used in pass 2), got {gamma!r}")
        if gamma < 1.0 and ascent_fraction < 1.0:
            raise ValueError(
                f"ESAM's data selection (gamma={gamma}) compares each sample's loss at w and at w + e, so pass 1 needs the "
                f"whole batch; ascent_fraction={ascent_fraction} leaves part of it out: use gamma=1 or ascent_fraction=1"
            )
        if mask is None:
            mask = StochasticMask(0.6 if beta is None else beta, granularity=granularity, seed=seed)
        super().__init__(
            params_or_optimizer, base_optimizer_cls, mask=mask, norm=norm, ascent_fraction=ascent_fraction, **kwargs
        )
        self.gamma = float(gamma)
        self._recording = False
        self._losses: list[Tensor] = []
        self._index: Tensor | None = None
        self._descent_cost = 1.0
        self._ones: dict[Tensor, Tensor] = {}  # an all-True mask per parameter, reused by SWP's per-step draws

    @property
    def beta(self) -> float:
        """SWP's probability (1.0 with another mask source: no rescaling)."""
        return self.mask_source.beta if isinstance(self.mask_source, StochasticMask) else 1.0

    # ------------------------------------------------------------------ the contract
    @property
    def batch_index(self) -> Tensor | None:
        return self._index if self.current_pass == DESCENT else None

    @property
    def wants_sample_losses(self) -> bool:
        return self._recording

    @property
    def selects_samples(self) -> bool:
        """True with ``gamma < 1``: pass 2 runs on the samples whose loss rose most."""
        return self.gamma < 1.0

    def record_sample_losses(self, losses: Tensor) -> None:
        if not self._recording:
            return
        if not isinstance(losses, Tensor) or losses.dim() != 1:
            raise ValueError(
                "record_sample_losses needs a 1-D tensor with one loss per sample (reduction='none'), got "
                + (f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__)
            )
        self._losses.append(losses.detach().float())

    def _pass_cost(self, kind: PassKind) -> float:
        return self._descent_cost if kind == DESCENT else super()._pass_cost(kind)

    @contextmanager
    def _record(self) -> Iterator[None]:
        self._losses, self._recording = [], True
        try:
            yield
        finally:
            self._recording = False

    def _take_losses(self, where: str) -> Tensor:
        if not self._losses:
            raise RuntimeError(
                f"ESAM(gamma={self.gamma}) selects the samples whose loss rose most, but the closure recorded no "
                f"per-sample losses in the {where} pass: while opt.wants_sample_losses is true, call "
                "opt.record_sample_losses(per_sample_losses) (see docs/variants.md), or use gamma=1 (no data selection)"
            )
        out = torch.cat(self._losses)
        self._losses = []
        return out

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """[`SSAM.first_step`][sparsam.SAM.first_step] with ρ scaled by 1/β (SWP)."""
        with self._rho_scaled(1.0 / self.beta):
            super().first_step(zero_grad, grad_scaler=grad_scaler)

    def _after_step(self) -> None:
        super()._after_step()
        src = self.mask_source
        if not isinstance(src, StochasticMask):
            return
        # SWP: the next step's mask, before its ascent pass.
        if src.granularity != "tensor" or self.form != "explicit":
            self._apply_source(src.update(self.mask_context()))
            return
        # Whole tensors: the draw is known on the host, so install it without reading masks back
        # from the device (set_masks classifies each mask with two host syncs). Every rank draws
        # the same sequence from the same seed, so no broadcast is needed.
        names = self.param_names()
        params = self._perturbable()
        keep = src.draw_tensors([names[p] for p in params])
        masks: dict[Tensor, Tensor] = {}
        kinds: dict[Tensor, int] = {}
        for p in params:
            if keep[names[p]]:
                m = self._ones.get(p)
                if m is None or m.shape != p.shape or m.device != p.device:
                    m = self._ones[p] = torch.ones(p.shape, dtype=torch.bool, device=p.device)
                masks[p], kinds[p] = m, _DENSE
            else:
                kinds[p] = _SKIP
        self._masks, self._kind = masks, kinds
        self._note_frozen(set(kinds))

    def _masks_renewed(self) -> bool:
        return isinstance(self.mask_source, StochasticMask) or super()._masks_renewed()  # SWP: every step

    def _sam_step(self, closure: Callable[[], Any], **kwargs: Any) -> Any:
        if self.gamma >= 1.0:
            return super()._sam_step(closure, **kwargs)
        with_grad = torch.enable_grad()(closure)
        with self.ascent_pass(), self._record():
            loss = with_grad()
        before = self._take_losses(ASCENT)
        self.first_step(zero_grad=True, grad_scaler=kwargs["grad_scaler"])
        try:
            with torch.no_grad(), no_running_stats(self.model), self._in_pass(MEASURE), self._record():
                closure()  # forward only, at w + e
            after = self._take_losses(MEASURE)
            if after.shape != before.shape:
                raise RuntimeError(
                    f"the closure recorded {before.numel()} per-sample losses at w and {after.numel()} at w + e: "
                    "both passes must cover the same samples, in the same order"
                )
            n = before.numel()
            keep = max(1, int(self.gamma * n))
            self._index = torch.topk(after - before, keep, sorted=False).indices.sort().values
            self._descent_cost = keep / n
            with self.descent_pass():
                with_grad()
        except BaseException:
            self.restore()
            self._index, self._descent_cost = None, 1.0
            raise
        self._index = None
        try:
            self.second_step(
                grad_scaler=kwargs["grad_scaler"],
                before_base_step=kwargs["before_base_step"],
                base_step=kwargs["base_step"],
            )
        finally:
            self._descent_cost = 1.0
        self._compute += FORWARD_COST
        return loss

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "gamma": self.gamma}

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", gamma={self.gamma})"


__all__ = ["ESAM", "FORWARD_COST"]
