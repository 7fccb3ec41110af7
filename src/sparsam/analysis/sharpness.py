"""Sharpness: the worst-case loss increase within an L2 ball, as SAM defines it.

Reference:
    P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur, "Sharpness-aware minimization for efficiently
    improving generalization", ICLR 2021.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ._common import LossFn, Objective, WeightGuard, check_nonnegative_float, check_positive_int

__all__ = ["mean_loss", "sam_sharpness"]


def mean_loss(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> float:
    """The size-weighted mean loss ``L(w) = Σ_b (n_b / N) L_b(w)`` over the batches given, with
    the model's mode and buffers left as they are (the objective every analysis tool uses)."""
    return Objective(model, loss_fn, data, device=device, n_batches=n_batches, require_grad=False).loss()


def _global_norm(ts: list[Tensor]) -> float:
    # one host sync: the step length depends on it
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in ts])))


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float = 0.05,
    *,
    n_steps: int = 1,
    step_size: float | None = None,
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> float:
    """SAM sharpness: how much the mean loss can rise within an L2 ball of radius ``rho``.

    ```text
    S_ρ(w) = max_{‖ε‖₂ ≤ ρ} L(w + ε) − L(w)  ≥  L(w + ρ g / ‖g‖₂) − L(w),      g = ∇L(w)
    ```

    ``n_steps=1`` is the first-order estimate, SAM's own perturbation (Foret et al. 2021, eq. 2).
    ``n_steps > 1`` continues with projected normalised-gradient ascent on the ball,

    ```text
    ε_{t+1} = Π_ρ( ε_t + (η / √t) · g_t / ‖g_t‖₂ ),      g_t = ∇L(w + ε_t),
    Π_ρ(ε)  = ε · min(1, ρ / ‖ε‖₂)
    ```

    from ``ε₁ = ρ g / ‖g‖``, and returns the largest increase among the iterates
    (each is feasible, so every value is a lower bound of ``S_ρ``, and more steps never give
    less). The norm is global over ``params``. At a stationary point (``g = 0``) the result is 0.

    Cost: ``n_steps`` forward+backward passes and one forward pass over the batches. The weights
    are moved in place and restored bitwise afterwards (also on error); buffers and mode untouched.

    Args:
        rho: radius of the ball (``>= 0``).
        n_steps: number of ascent steps (1: first-order).
        step_size: ``η`` for steps 2 and later, divided by ``√t`` at step ``t + 1``
            (default ``rho / 2``). A fixed point on the sphere stays fixed whatever the step; the
            decreasing steps also let the iterates settle on a maximum inside the ball.
        params: the perturbed parameters (default: every parameter with ``requires_grad``).
        device, n_batches: as in
            [`hessian_vector_product`][sparsam.analysis.hessian_vector_product].

    Returns:
        The sharpness, a Python float.
    """
    rho = check_nonnegative_float("rho", rho)
    check_positive_int("n_steps", n_steps)
    eta = rho / 2 if step_size is None else check_nonnegative_float("step_size", step_size, positive=True)
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches, cache_graph=False)
    with WeightGuard(obj.params) as guard:
        loss0, g = obj.loss_and_grad()
        gnorm = _global_norm(g)
        if rho == 0.0 or gnorm == 0.0:
            return 0.0
        eps = [t.mul(rho / gnorm) for t in g]
        best = -math.inf
        for step in range(1, n_steps + 1):
            guard.set((1.0, eps))
            if step == n_steps:
                best = max(best, obj.loss())
                break
            loss, g = obj.loss_and_grad()
            best = max(best, loss)
            gnorm = _global_norm(g)
            if gnorm == 0.0:
                break
            eta_t = eta / math.sqrt(step)  # decreasing steps: converge also to an interior maximum
            eps = [e.add(t, alpha=eta_t / gnorm) for e, t in zip(eps, g)]
            enorm = _global_norm(eps)
            if enorm > rho:
                eps = [e.mul_(rho / enorm) for e in eps]
    return best - loss0
