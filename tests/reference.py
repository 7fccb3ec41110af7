"""Plain reference implementations used by the tests: written as simply as possible, one tensor at a
time, straight from the formulas in docs/design.md ("One step")."""

from __future__ import annotations

import torch
from torch import nn


def reference_sam_step(
    params,
    base,
    closure,
    *,
    rho,
    adaptive=False,
    eta=0.01,
    eps=1e-12,
    masks=None,
    norm="full",
    clip=None,
):
    """One SAM / ASAM / SSAM step. ``params``: list of tensors all in one group with radius ``rho``.
    ``masks``: None (SAM) or a list of bool tensors / None (None = not perturbed)."""
    base.zero_grad()
    loss = closure()
    with torch.no_grad():
        grads = [p.grad.clone() if p.grad is not None else None for p in params]
        if masks is None:
            masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
        terms = []
        for p, g, m in zip(params, grads, masks):
            if g is None:
                continue
            t = (p.abs() + eta) if adaptive else torch.ones_like(p)
            x = t * g
            if norm == "masked":
                if m is None:
                    continue
                x = x * m
            terms.append((x**2).sum())
        n = torch.sqrt(sum(terms)) if terms else torch.zeros(())
        old = [p.clone() for p in params]
        for p, g, m in zip(params, grads, masks):
            if g is None or m is None:
                continue
            t = (p.abs() + eta) if adaptive else torch.ones_like(p)
            p.add_(rho * t * t * g * m / (n + eps))
    base.zero_grad()
    closure()
    with torch.no_grad():
        for p, o in zip(params, old):
            p.copy_(o)
    if clip is not None:  # documented order: restore, clip the descent gradient, step
        torch.nn.utils.clip_grad_norm_(params, clip)
    base.step()
    return loss


def quadratic_setup(dim=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, dim, generator=g, dtype=dtype)
    a = q @ q.T + dim * torch.eye(dim, dtype=dtype)
    w0 = torch.randn(dim, generator=g, dtype=dtype)
    return a, w0


def tiny_net(seed=0, dtype=torch.float64, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)]
    if bn:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(dtype)


def tiny_data(n=16, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y
