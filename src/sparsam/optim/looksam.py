"""LookSAM: the SAM gradient every k steps, its flat-region component reused in between.

Liu, Mai, Chen, Hsieh and You, "Towards Efficient and Scalable Sharpness-Aware Minimization",
CVPR 2022 (arXiv 2203.02714), Algorithm 1. With g = ∇L(w) the plain gradient of the step:

    t mod k = 0:  g_s = ∇L(w + ρ g/‖g‖)                      (SAM's gradient: 2 passes)
                  g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) g            (the part of g_s orthogonal to g, stored)
                  w  ← base step on g_s
    otherwise:    w  ← base step on g + α · (‖g‖ / ‖g_v‖) · g_v   (1 pass)

The norms and the inner product are global (over every parameter with a gradient), as in the
paper's algorithm; ``per_tensor=True`` applies the projection and the rescaling to each tensor
on its own, as the public re-implementations do (each tensor's reused part is then α times that
tensor's own gradient norm). The paper reports LookSAM-5 (k = 5) close to SAM's accuracy at a
cost near SGD's; ``alpha = 0.7`` is the value used with k = 5 by the public re-implementations
(e.g. Leminhbinh0209/LookSAM's README); the paper treats α as a hyperparameter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import Tensor

from .schedule import ScheduledSAM
from .ssam import SSAM


def _dot(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch.stack(
        [torch.sum(x * y, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32) for x, y in zip(a, b)]
    ).sum()


def _coef(a: list[Tensor], s: list[Tensor]) -> Tensor:
    """⟨a, s⟩ / ‖a‖² (0 where a = 0): the projection coefficient of s on a."""
    aa = _dot(a, a)
    return torch.where(aa > 0, _dot(a, s) / torch.where(aa > 0, aa, torch.ones_like(aa)), torch.zeros_like(aa))


def _norm(a: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(x, 2, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
                for x in a
            ]
        ),
        2,
    )


class LookSAM(ScheduledSAM):
    """LookSAM (Liu et al., CVPR 2022) around any optimizer: see the module docstring for the rule.

    The SAM steps are those of a [`SAMSchedule`][sparsam.optim.schedule.SAMSchedule] with
    ``every=k``: ``start`` (late phase) and ``ramp`` compose (before the SAM phase, and until the
    first SAM step has stored a g_v, steps are plain SGD steps), and so does ``ascent_fraction``
    (pass 1 of the SAM steps from part of the batch; g is then that part's gradient).
    [`LookSSAM`][sparsam.optim.looksam.LookSSAM] adds SSAM's masks (g_s is SSAM's gradient).

    Args:
        params_or_optimizer, base_optimizer_cls, **kwargs: as [`ScheduledSAM`][sparsam.optim.schedule.ScheduledSAM]
            (``every`` is not accepted: ``k`` is LookSAM's every).
        k: a SAM step every k steps (k = 1 is SAM).
        alpha: α, the weight of the reused component.
        per_tensor: project g_s on g and rescale g_v per tensor instead of over all parameters at
            once (the public re-implementations' form).

    Under DDP with ``ascent="local"`` the ascent gradient g differs between ranks, so g_v is
    averaged over the ranks (one all-reduce every k steps) to keep the replicas identical. With
    a GradScaler, a g_v computed from a non-finite gradient is not stored (the previous one is
    kept; this reads one flag back to the host every k steps).
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[torch.optim.Optimizer] | None = None,
        *,
        k: int = 5,
        alpha: float = 0.7,
        per_tensor: bool = False,
        **kwargs: Any,
    ) -> None:
        if "every" in kwargs:
            raise ValueError(
                f"LookSAM's k is its every-k schedule: give k= only, got k={k!r} and every={kwargs['every']!r}"
            )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1 (a SAM step every k steps), got {k!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha < float("inf"):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if not isinstance(per_tensor, bool):
            raise TypeError(f"per_tensor must be a bool, got {per_tensor!r}")
        super().__init__(params_or_optimizer, base_optimizer_cls, every=k, **kwargs)
        self.k, self.alpha, self.per_tensor = k, float(alpha), per_tensor
        self._gv: dict[Tensor, Tensor] = {}  # the stored orthogonal component (saved in state_dict)
        self._g: dict[Tensor, Tensor] | None = None  # transient: the ascent gradient of a SAM step

    def _sam_step(self, closure: Any, **kwargs: Any) -> Any:
        self._g = {}
        try:
            return super()._sam_step(closure, **kwargs)
        finally:
            self._g = None

    def _before_perturb(self) -> None:
        super()._before_perturb()
        if self._g is not None:
            self._g = {p: p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None}

    @torch.no_grad()
    def _base_step(self, scaler: Any, before_base_step: Any = None) -> None:
        if self._g is not None:  # a SAM step: p.grad holds g_s (w is restored); store g_v
            self._store_gv(self._g, checked=scaler is not None)
        super()._base_step(scaler, before_base_step)

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        *,
        grad_scaler: Any = None,
        before_base_step: Any = None,
        base_step: bool = True,
    ) -> None:
        # base_step=False (the transformers Trainer steps the base optimizer itself): no _base_step
        # runs, so g_v is stored here, from the same g_s (scaled or not: g_v's scale cancels; a
        # descent gradient marked non-finite after an overflowed ascent stores nothing).
        store = not base_step and self._g is not None and self._in_perturbation
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else self._scaler
        super().second_step(grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step)
        if store and self._g is not None:
            self._store_gv(self._g, checked=scaler is not None)
        if zero_grad:
            self.zero_grad()

    def _store_gv(self, g: dict[Tensor, Tensor], *, checked: bool) -> None:
        params = [p for grp in self.param_groups for p in grp["params"] if p.grad is not None]
        if not params:
            return
        gs = [p.grad for p in params]
        ga = [g.get(p, torch.zeros_like(p.grad)) for p in params]  # frozen in pass 1: no ascent gradient
        if self.per_tensor:
            gv = [s - _coef([a], [s]).to(s.dtype) * a for s, a in zip(gs, ga)]
        else:
            c = _coef(ga, gs)
            gv = [s - c.to(s.dtype) * a for s, a in zip(gs, ga)]
        if self.ascent == "local" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([v.reshape(-1) for v in gv])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            gv = [part.view_as(v) for part, v in zip(flat.split([v.numel() for v in gv]), gv)]
        if checked and not bool(torch.isfinite(_norm(gv))):  # host sync: every k steps, under a GradScaler only
            return
        self._gv = dict(zip(params, gv))

    @torch.no_grad()
    def _after_plain_pass(self) -> None:
        if not self._gv or not self.schedule.in_sam_phase(self._t):
            return
        params = [p for p in self._gv if p.grad is not None]
        if not params:
            return
        g = [cast(Tensor, p.grad) for p in params]
        v = [self._gv[p] for p in params]
        if self.per_tensor:
            for gp, gv in zip(g, v):
                gp.add_(gv * (self.alpha * _norm([gp]) / (_norm([gv]) + self.eps)).to(gv.dtype))
            return
        scale = self.alpha * _norm(g) / (_norm(v) + self.eps)
        for gp, gv in zip(g, v):
            gp.add_(gv * scale.to(gv.dtype))

    # ------------------------------------------------------------------ checkpoints
    _STATE_KEYS: ClassVar[tuple[str, ...]] = ("look_gv",)

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "k": self.k, "alpha": self.alpha, "per_tensor": self.per_tensor}

    def _extra_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        return {**super()._extra_state(), "look_gv": {index[p]: v.clone() for p, v in self._gv.items()}}

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._check_extra_state(extra)
        gv = extra.get("look_gv", {})
        params = [p for g in self.param_groups for p in g["params"]]
        if not isinstance(gv, Mapping):
            raise TypeError(f"the state's look_gv must be a dict, got {type(gv).__name__}")
        for i, v in gv.items():
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(params):
                raise ValueError(
                    f"the state's look_gv has an entry for parameter index {i!r}, the optimizer has {len(params)}"
                )
            if not isinstance(v, Tensor) or v.shape != params[i].shape:
                raise ValueError(
                    f"the state's look_gv for parameter {i} does not have the parameter's shape {tuple(params[i].shape)}"
                )

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        super()._load_extra_state(extra)
        params = [p for g in self.param_groups for p in g["params"]]
        self._gv = {
            params[i]: v.to(params[i].device, params[i].dtype).clone() for i, v in extra.get("look_gv", {}).items()
        }

    def __repr__(self) -> str:
        tensor = ", per_tensor=True" if self.per_tensor else ""
        return super().__repr__()[:-1] + f", k={self.k}, alpha={self.alpha}{tensor})"


class LookSSAM(LookSAM, SSAM):
    """[`LookSAM`][sparsam.optim.looksam.LookSAM] with SSAM's masks: on the SAM steps the
    perturbation is masked (g_s is SSAM's gradient), in between g_v is reused as in LookSAM.
    ``sparsam train --opt lookssam --mask fisher`` (method ``lookssam-f``).

    Every [`SSAM`][sparsam.SSAM] argument is accepted except two that change pass 1's gradient,
    which LookSAM needs whole (g_v is g_s minus its projection on g = ∇L(w)):
    ``sparse_ascent=True`` (the unperturbed tensors would have no g) and ``form="implicit"`` (g
    would come from the masked backward); both raise ``ValueError``. ``sparse_ascent`` defaults
    to ``False`` here, also with ``norm="masked"``.
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[torch.optim.Optimizer] | None = None,
        *,
        sparse_ascent: bool | None = None,
        form: str = "explicit",
        **kwargs: Any,
    ) -> None:
        if sparse_ascent:
            raise ValueError(
                "LookSSAM needs pass 1's gradient g = ∇L(w) of every parameter (g_v is g_s minus its projection on "
                "g); sparse_ascent=True leaves the unperturbed tensors out of it: use sparse_ascent=False"
            )
        if form != "explicit":
            raise ValueError(
                f"LookSSAM needs form='explicit', got form={form!r}: the implicit form's pass 1 runs a masked "
                "backward, so its gradient is not the g = ∇L(w) that LookSAM projects g_s on"
            )
        super().__init__(params_or_optimizer, base_optimizer_cls, sparse_ascent=False, form=form, **kwargs)


__all__ = ["LookSAM", "LookSSAM"]
