"""Momentum-SAM (MSAM): SAM's perturbation along the negative momentum, one pass per step.

Becker, Altrock and Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead", arXiv 2401.12033 (2024), Algorithm 1 ("SGD with Momentum-SAM"). Written from the paper's
pseudocode; facts about the authors' release (github.com/MarlonBecker/MSAM) are cited where used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..masks.base import LossFn, MaskSource
from . import _functional as kernels
from .. import _sharded
from . import sam as _sam
from .sam import ASCENT, SAM, _check_rho
from .ssam import SSAM

#: the version of the ``"sparsam"`` entry of MSAM's ``state_dict()`` (SAM's); others are refused on load
MSAM_STATE_VERSION: int = getattr(_sam, "STATE_VERSION", 1)


def _direction_key(base: Optimizer) -> str:
    """The base optimizer's state entry MSAM perturbs along: SGD's ``momentum_buffer``, Adam's and
    AdamW's first moment ``exp_avg``."""
    if isinstance(base, torch.optim.SGD):
        return "momentum_buffer"
    if isinstance(base, (torch.optim.Adam, torch.optim.AdamW)):
        return "exp_avg"
    raise TypeError(
        f"MSAM perturbs along the base optimizer's momentum: it supports torch.optim.SGD (momentum > 0), Adam and "
        f"AdamW, got {type(base).__name__}"
    )


class MSAM(SAM):
    r"""Momentum-SAM around SGD with momentum (or Adam/AdamW): SAM's sharpness-aware gradient at
    the price of one forward and backward pass per step (Becker et al., arXiv 2401.12033).

    One step ``t``, with ``v`` the base optimizer's momentum as the previous step left it (the
    buffer *before* this step's update; the paper's ``v_t``):

    ```text
    w~ = w − rho · v / (‖v‖₂ + eps)        ‖·‖₂ over the momentum of every group with rho > 0
    g  = ∇L_B(w~)                            the step's only pass (closure called once)
    w  ← w                                   restored exactly: storage exchanged back or copied, never subtracted
    w  ← base_optimizer.step(w, g)           v ← μ v + g (SGD), then w ← w − η v: from w, not from w~
    ```

    This is the paper's Algorithm 1, which keeps the weights at ``w~`` *between* steps (it removes
    the last perturbation after the pass, steps, and perturbs again for the next iteration); here
    the perturbation is put on at the start of the step and taken off right after the pass, the same
    sequence of weights for the gradient, with the weights at ``w`` whenever the caller sees them
    (evaluation, checkpoints, LR schedulers). The sign: ``−v`` points back along the trajectory
    (``w`` moves by ``−η v``), which is the ascent direction the paper argues for.

    Conventions:

    - **Direction.** SGD: ``state["momentum_buffer"]`` (torch's convention ``v ← μ v + (1 − τ) g``,
      with weight decay in ``g``; Nesterov only changes the update, not ``v``). Adam / AdamW: the
      first moment ``state["exp_avg"]`` (``m ← β₁ m + (1 − β₁) g``, not bias-corrected; the
      normalisation removes its scale): the rule of the authors' ``AdamW_MSAM`` (their README's
      ImageNet ViT command), and the abstract's claim of MSAM "over SGD or Adam" without overhead
      needs a momentum-like vector in Adam, which is its first moment. Other base optimizers are
      refused, as is SGD with ``momentum=0`` (no direction).
    - **First step.** Before the base optimizer's first step there is no momentum (the paper's
      ``v₀ = 0``): nothing is perturbed, the step is the base optimizer's. Likewise a parameter
      without a buffer yet, and an all-zero momentum (``e = −0``, ``w~ = w`` exactly).
    - **Norm.** One global L2 norm over the momentum of every perturbed group, ``eps = 1e-12``
      added to it (the authors' release); each group scales by its own ``rho``. ``rho = 0``: the
      base optimizer, bit for bit (nothing copied or touched).
    - **BatchNorm**, as the paper does: the one pass runs at ``w~`` in training mode, so running
      statistics are gathered at ``w~`` (there is no clean pass). The authors recompute them at ``w``
      after training for convolutional networks, with one forward-only epoch over the training
      data in training mode; do the same before deploying a BatchNorm model.
    - **Weight decay** is the base optimizer's, at ``w`` (the authors' SGD adds it to the gradient
      while the weights are still at ``w~``: a difference of ``wd · rho`` along ``v/‖v‖``).
    - **Data parallel (DDP):** the momentum is built from all-reduced gradients, so every rank
      holds the same ``v`` and perturbs identically with no communication; the pass's gradient is
      all-reduced as for SGD. **FSDP2:** the norm runs over the local shards with one all-reduce
      of a scalar (``sparsam._sharded``), the perturbation on each rank's shard.
    - **Mixed precision:** the momentum is never scaled by a GradScaler, so the perturbation needs
      no unscaling; ``grad_scaler=`` is used for the base step (``scaler.step``: a non-finite
      gradient skips it and leaves ``v`` unchanged). bf16 / fp16 weights: the norm is reduced in
      float32.
    - **Gradient accumulation:** every micro-batch of a step must run at ``w~``: call the closure's
      micro-batches in one ``step`` call, or run the window's earlier micro-batches inside
      [`perturbation`][sparsam.optim.msam.MSAM.perturbation] (the framework helpers do).

    [`compute`][sparsam.SAM.compute] counts 1.0 SGD-step equivalent per step.
    [`current_pass`][sparsam.SAM.current_pass] is ``None`` during the pass (one pass, whose
    gradient is all-reduced and whose loss is the step's logged loss, at ``w~``). The optimizer's own
    state is the base optimizer's (the momentum) plus the step counter of ``compute``, so a resumed
    run continues bit for bit.

    Args:
        params_or_optimizer, base_optimizer_cls, **base_kwargs: as [`SAM`][sparsam.SAM]: a built
            ``torch.optim.SGD`` (with ``momentum > 0``), ``Adam`` or ``AdamW``, or parameters and the class.
        rho: neighbourhood radius. Default 3.0: the value of the authors' README commands for
            CIFAR-100 (WideResNet-16-4, ResNet-50) and ImageNet (ResNet-50, ViT-S/32); MSAM's best
            rho is far larger than SAM's (their SAM commands use 0.2).
        eps, foreach, model, max_grad_norm, exchange: as [`SAM`][sparsam.SAM]. ``model`` is not
            needed (no BatchNorm handling, no DDP ``no_sync``).

    ```python
    import torch
    import torch.nn.functional as F
    from torch import nn
    from sparsam.optim import MSAM

    net = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.arange(8) % 3
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9)

    def closure():  # called once per step, at w~
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    print(opt.compute)  # 3.0: one pass per step
    ```
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[Optimizer] | None = None,
        *,
        rho: float = 3.0,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("adaptive"):
            raise ValueError("MSAM has no adaptive (ASAM) form: got adaptive=True")
        if kwargs.get("ascent", "local") != "local":
            raise ValueError(
                f"MSAM has no ascent pass, so ascent={kwargs['ascent']!r} has no meaning: every rank holds the same "
                "momentum and perturbs identically"
            )
        super().__init__(params_or_optimizer, base_optimizer_cls, rho=rho, **kwargs)
        self._key = _direction_key(self.base_optimizer)
        for group in self.param_groups:
            self._check_momentum(group)

    def _check_momentum(self, group: Mapping[str, Any]) -> None:
        if self._key == "momentum_buffer" and group["rho"] > 0 and not group.get("momentum"):
            raise ValueError(
                f"MSAM perturbs along SGD's momentum, but a parameter group with rho={group['rho']} has "
                f"momentum={group.get('momentum')!r}: give it momentum > 0 (the paper: 0.9), or rho=0"
            )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if hasattr(self, "_key"):  # not during __init__ (checked there once the key is known)
            self._check_momentum(self.param_groups[-1])

    # ------------------------------------------------------------------ the contract
    def _pass_cost(self, kind: str) -> float:
        return 0.0 if kind == ASCENT else 1.0

    def ascends_next(self) -> bool:
        """Never: MSAM's one pass runs at the perturbed weights ``w~``, with no ascent pass."""
        return False

    def accumulation_pass(self) -> AbstractContextManager[None]:
        """A micro-batch run ahead of [`step`][sparsam.optim.msam.MSAM.step] takes its gradient at
        the step's ``w~``: [`perturbation`][sparsam.optim.msam.MSAM.perturbation]."""
        return self.perturbation()

    @contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """MSAM has no ascent pass: raises ``RuntimeError``."""
        raise RuntimeError(
            "MSAM runs one pass per step, at the perturbed weights: it has no ascent pass (use step(closure), or "
            "first_step() / second_step() around the one pass)"
        )
        yield  # pragma: no cover

    @contextmanager
    def descent_pass(self) -> Iterator[None]:
        """Context for MSAM's one pass (at ``w~``): ``current_pass`` stays ``None`` (a plain pass,
        its gradient all-reduced, its loss the step's), and BatchNorm running statistics update as
        in the paper (see the class docstring)."""
        with self._in_pass(None):
            yield

    # ------------------------------------------------------------------ the step
    def _direction(self, p: Tensor) -> Tensor | None:
        v = self.state.get(p, {}).get(self._key)
        return v if isinstance(v, Tensor) else None

    def _before_perturb(self) -> None:
        """Called at the start of [`first_step`][sparsam.SAM.first_step] (sparse MSAM: masks)."""

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Move every perturbed parameter to ``w~ = w − rho · v / (‖v‖ + eps)``, reading only the
        base optimizer's momentum (``p.grad`` is neither read nor cleared unless ``zero_grad``).

        Args:
            zero_grad: clear the gradients afterwards (ready for the pass).
            grad_scaler: the ``torch.amp.GradScaler`` of the pass, remembered for
                [`second_step`][sparsam.SAM.second_step] (nothing here is scaled).
        """
        if self._in_perturbation:
            raise RuntimeError("first_step() was called twice without second_step(): the weights are already at w~")
        self._scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self._found_inf = None
        self._before_perturb()
        use_masked = self._use_masked_norm()
        foreach = self.foreach is not False
        plan = []
        terms: list[Tensor] = []
        for group in self.param_groups:
            rho = _check_rho(group["rho"])
            if rho == 0.0:
                continue
            ps, vs, ms, owned = [], [], [], []  # perturbed
            norm_ps, norm_vs, norm_ms = [], [], []  # counted in the norm
            for p in group["params"]:
                v = self._direction(p)
                if v is None:  # no momentum yet (before the first base step): not perturbed
                    continue
                active, m = self._mask_of(p)
                lp, lv = _sharded.local(p), _sharded.local(v)  # FSDP2: this rank's shards
                if active:
                    ps.append(lp)
                    vs.append(lv)
                    ms.append(m)
                    owned.append(lp is p)
                if active or not use_masked:
                    norm_ps.append(lp)
                    norm_vs.append(lv)
                    norm_ms.append(m if use_masked else None)
            if norm_vs:
                terms += kernels.norm_terms(norm_ps, norm_vs, norm_ms, adaptive=False, eta=0.0, foreach=foreach)
            if ps:
                plan.append((rho, ps, vs, ms, owned))

        perturbed: list[Tensor] = []
        exchanged: list[bool] = []
        if plan:
            norm = kernels.global_norm(terms)
            mesh = _sharded.sharding_of(
                p for g in self.param_groups if g["rho"] > 0 for p in g["params"] if self._direction(p) is not None
            )
            if mesh is not None:  # the norm over every shard on every rank: one all-reduce of a scalar
                norm = _sharded.reduce_norm(norm, mesh)
            for rho, ps, vs, ms, owned in plan:
                scale = -rho / (norm + self.eps)  # a 0-dim tensor: no host synchronisation
                exchanged += self._move_to_perturbed(ps, vs, ms, owned, scale)
                perturbed += ps
        self._perturbed = perturbed
        self._exchanged = exchanged
        torch.clear_autocast_cache()  # casts of w cached by an enclosing autocast region (see SAM.first_step)
        self._in_perturbation = True
        self._compute += self._pass_cost(ASCENT)
        if zero_grad:
            self.zero_grad()

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> Any:
        """One MSAM step: perturb, call ``closure()`` once at ``w~`` (it computes the loss and calls
        ``backward``, through the GradScaler if one is given), restore ``w`` exactly, then [unscale,
        clip, ``before_base_step``,] the base step. Gradients are not cleared before the pass (clear
        them before calling ``step``, or accumulate into them). Returns the closure's result: the
        loss at ``w~``. On any exception from the closure the weights are restored and nothing steps.

        Args:
            closure: see above; [`current_pass`][sparsam.SAM.current_pass] is ``None`` inside it.
            grad_scaler, before_base_step, base_step: as for [`SAM.step`][sparsam.SAM.step].
        """
        if closure is None:
            raise TypeError(
                "MSAM.step() needs a closure that computes the loss and calls backward (it is evaluated once, at the "
                "perturbed weights); for a hand-written loop use first_step() / second_step() around the pass"
            )
        self.first_step(grad_scaler=grad_scaler)
        try:
            with torch.enable_grad(), self.descent_pass():
                loss = closure()
        except BaseException:  # KeyboardInterrupt included: never leave the weights at w~
            self.restore()
            raise
        self.second_step(grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step)
        return loss

    @contextmanager
    def perturbation(self) -> Iterator[None]:
        """The weights at ``w~`` inside, restored exactly on exit (no base step, nothing counted):
        for the micro-batches of an accumulation window before the last, whose gradients must be
        taken at the same ``w~`` as the last one's (which goes through [`step`][sparsam.optim.msam.MSAM.step];
        the momentum does not change within the window, so every micro-batch sees the same ``w~``).
        A sparse MSAM's mask update for the step runs at the window's first ``first_step`` only."""
        self.first_step()
        try:
            with self.descent_pass():
                yield
        finally:
            self.restore()

    # ------------------------------------------------------------------ checkpoints
    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        # MSAM's own entry is SAM's (type, base, compute; the momentum is the base optimizer's
        # state), at the same "version": one that this sparsam does not know is refused.
        if isinstance(extra, Mapping) and extra.get("type") in ("MSAM", "SparseMSAM"):
            version = extra.get("version")
            if version != MSAM_STATE_VERSION:
                raise ValueError(
                    f"this {extra['type']} state has version {version!r}; this sparsam reads version "
                    f"{MSAM_STATE_VERSION}: it was written by another sparsam version"
                )
        super()._check_extra_state(extra)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)}, rho={self._sam_defaults['rho']})"


class SparseMSAM(MSAM, SSAM):
    r"""Sparse Momentum-SAM: MSAM's perturbation restricted by an SSAM mask (``m = 1``: perturbed).

    ```text
    norm="full"   (default, as SSAM):   w~ = w − rho · m ⊙ v / (‖v‖₂ + eps)       ‖w~ − w‖ <= rho
    norm="masked" (renormalised):       w~ = w − rho · m ⊙ v / (‖m ⊙ v‖₂ + eps)   ‖w~ − w‖ = rho
    ```

    One pass per step, as [`MSAM`][sparsam.optim.msam.MSAM]; the masks are SSAM's (mask sources,
    ``set_masks``, masks in ``state_dict``, broadcast from rank 0 under ``torch.distributed``,
    per-shard under FSDP2). An all-True mask is MSAM exactly, an all-False mask the base optimizer.

    When masks are made: ``init`` at the first step, before its perturbation. Updates of sources
    that read no gradient (Fisher, random) run at the start of step ``t`` as in SSAM
    (``wants_update(t)``). A source that reads the gradient (dynamic: drop the smallest ``|g|``)
    has no gradient at ``w`` in MSAM: its update runs after step ``t``'s pass, on that pass's
    gradient (taken at ``w~``, ranked as it is: under a GradScaler still scaled, which does not
    change a ranking; an update whose gradient is not finite is skipped, one host synchronisation
    on update steps only), and the new mask serves from step ``t + 1``.

    Cost: [`compute`][sparsam.SAM.compute] adds, each time a mask source that needs data (Fisher)
    computes a mask, ``num_samples / batch_size`` SGD-step equivalents (Ns per-sample gradients,
    counted as Ns samples' forward and backward); ``batch_size`` (the training batch size) is
    required with such a source. The all-False start of ``timing="after-step"`` computes nothing.

    Args:
        params_or_optimizer, base_optimizer_cls, rho, **kwargs: as [`MSAM`][sparsam.optim.msam.MSAM].
        sparsity, mask, norm, model, loss_fn, data, sync_masks: as [`SSAM`][sparsam.SSAM].
        batch_size: the training batch size, for the Fisher mask's cost (see above).

    SSAM's ``form="implicit"`` and ``sparse_ascent`` act on an ascent pass, which MSAM does not
    have: they are refused.
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[Optimizer] | None = None,
        *,
        rho: float = 3.0,
        sparsity: float | None = None,
        mask: MaskSource | None = None,
        norm: str = "full",
        model: nn.Module | None = None,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        sync_masks: bool = True,
        batch_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        for name, default in (("form", "explicit"), ("sparse_ascent", False)):
            if kwargs.get(name, default) not in (default, None):
                raise ValueError(
                    f"SparseMSAM has no ascent pass, so {name}={kwargs[name]!r} has no meaning (only {default!r})"
                )
        kwargs.pop("form", None)
        kwargs.pop("sparse_ascent", None)
        super().__init__(
            params_or_optimizer,
            base_optimizer_cls,
            rho=rho,
            sparsity=sparsity,
            mask=mask,
            norm=norm,
            model=model,
            loss_fn=loss_fn,
            data=data,
            sync_masks=sync_masks,
            form="explicit",
            sparse_ascent=False,
            **kwargs,
        )
        if self.mask_source.needs_data:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
                raise ValueError(
                    f"SparseMSAM with a {type(self.mask_source).__name__} counts the mask's cost in compute as "
                    f"num_samples / batch_size: pass batch_size= (the training batch size, an int >= 1), got "
                    f"{batch_size!r}"
                )
        self.batch_size = batch_size
        self._updated_at: int | None = None  # the step whose mask update ran (once per step, not per micro-batch)

    def _mask_cost(self) -> float:
        """SGD-step equivalents of one mask computation by the mask source."""
        if not self.mask_source.needs_data or self.batch_size is None:
            return 0.0
        return float(getattr(self.mask_source, "num_samples", 0)) / self.batch_size

    def init_masks(self) -> None:
        computes = not (self.mask_source.needs_data and getattr(self.mask_source, "timing", None) == "after-step")
        super().init_masks()
        if computes:
            self._compute += self._mask_cost()

    def _before_perturb(self) -> None:
        self._base_stepped = self._step_deferred = False
        if not self._masks_ready:
            self.init_masks()
        elif (
            not self.mask_source.needs_grads
            and self._updated_at != self._steps
            and self.mask_source.wants_update(self._steps)
        ):
            self._updated_at = self._steps
            self._apply_source(self.mask_source.update(self.mask_context()))
            self._compute += self._mask_cost()

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> None:
        if not self._in_perturbation:
            raise RuntimeError("second_step() was called before first_step(): there is no perturbation to undo")
        src = self.mask_source
        if src.needs_grads and self._masks_ready and self._updated_at != self._steps and src.wants_update(self._steps):
            self._restore_weights()  # the source sees w (and the pass's gradient, taken at w~)
            self._perturbed, self._exchanged = [], []
            grads = [p.grad for p in self._perturbable() if p.grad is not None]
            # Host sync, on mask-update steps only: a non-finite gradient (an fp16 overflow) makes no mask.
            if all(bool(torch.isfinite(_sharded.local(g)).all()) for g in grads):
                self._updated_at = self._steps
                self._apply_source_in_step(src)
        super().second_step(zero_grad, grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step)

    def _apply_source_in_step(self, src: MaskSource) -> None:
        # set_masks refuses to run while the weights are perturbed; they are at w here (restored above).
        self._in_perturbation = False
        try:
            self._apply_source(src.update(self.mask_context()))
        finally:
            self._in_perturbation = True


__all__ = ["MSAM", "SparseMSAM"]
