"""Functional kernels of SAM / ASAM / SSAM: gradient norm, perturbation, restore.

Each kernel has a for-loop path (the ground truth, one tensor at a time) and a multi-tensor path
(``torch._foreach_*``) that performs the same elementwise operations in the same order, so the two
agree bitwise on the CPU (tests pin this). Nothing here synchronises with the host: scales are
0-dim tensors and never leave the device.

Notation (Foret et al. 2021, Kwon et al. 2021, Mi et al. 2022):

    T   = |w| + eta            (ASAM, adaptive=True)      T = 1 (SAM)
    m   = bool mask             (SSAM)                     m = 1 (SAM)
    n   = || T g ||_2            over every perturbable gradient   (norm="full")
        = || m T g ||_2                                            (norm="masked")
    e   = rho / (n + eps) * m * T^2 g
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norm_dtype(t: Tensor) -> torch.dtype | None:
    # Reduce half-precision gradients in float32 so the norm cannot overflow (65504 in fp16).
    return torch.float32 if t.dtype in _LOW_PRECISION else None


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), as multi-tensor kernels require."""
    out: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        out[(t.device, t.dtype)].append(i)
    return out


def norm_terms(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    *,
    adaptive: bool,
    eta: float,
    foreach: bool,
) -> list[Tensor]:
    """Per-tensor L2 norms of ``m * T * g`` (``m`` skipped where the mask is ``None``).

    The global norm is ``vector_norm(stack(terms))`` over the terms of every group.
    """
    if not foreach:
        out = []
        for p, g, m in zip(params, grads, masks):
            x = g
            if adaptive:
                x = g * p.abs().add_(eta)
            if m is not None:
                x = x * m
            out.append(torch.linalg.vector_norm(x, 2, dtype=_norm_dtype(x)))
        return out

    result: list[Tensor | None] = [None] * len(grads)
    for (_, dtype), idx in _buckets(grads).items():
        ps = [params[i] for i in idx]
        xs = [grads[i] for i in idx]
        if adaptive:
            t = torch._foreach_abs(ps)
            torch._foreach_add_(t, eta)
            xs = torch._foreach_mul(xs, t)
        sel = [j for j, i in enumerate(idx) if masks[i] is not None]
        if sel:
            if not adaptive:  # do not write into the gradients themselves
                xs = list(xs)
                for j in sel:
                    xs[j] = xs[j] * masks[idx[j]]
            else:
                torch._foreach_mul_([xs[j] for j in sel], [masks[idx[j]] for j in sel])
        norms = torch._foreach_norm(xs, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        for i, n in zip(idx, norms):
            result[i] = n
    return result  # type: ignore[return-value]


def global_norm(terms: Sequence[Tensor]) -> Tensor:
    """L2 norm of the per-tensor norms (on the first term's device, in the widest dtype)."""
    dev = terms[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([t.to(dev, dtype) for t in terms]), 2)


def perturb_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    backups: Sequence[Tensor],
    scale: Tensor,
    *,
    adaptive: bool,
    eta: float,
    foreach: bool,
) -> None:
    """Save ``w`` into ``backups`` and move ``w`` to ``w + e`` with ``e = scale * m * T^2 g``.

    Where a mask entry is False, ``e`` is ±0 and ``w`` keeps its exact value.
    """
    if not foreach:
        for p, g, m, b in zip(params, grads, masks, backups):
            b.copy_(p)
            s = scale.to(p.device)
            if adaptive:
                t = p.abs().add_(eta)
                e = g * t
                e.mul_(t)
                e.mul_(s)
            else:
                e = g * s
            if m is not None:
                e.mul_(m)
            p.add_(e)
        return

    for (device, _), idx in _buckets(params).items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        torch._foreach_copy_([backups[i] for i in idx], ps)
        s = scale.to(device)
        if adaptive:
            t = torch._foreach_abs(ps)
            torch._foreach_add_(t, eta)
            es = torch._foreach_mul(gs, t)
            torch._foreach_mul_(es, t)
            torch._foreach_mul_(es, s)
        else:
            es = torch._foreach_mul(gs, s)
        sel = [j for j, i in enumerate(idx) if masks[i] is not None]
        if sel:
            torch._foreach_mul_([es[j] for j in sel], [masks[idx[j]] for j in sel])
        torch._foreach_add_(ps, es)


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor], *, foreach: bool) -> None:
    """Copy ``w`` back from its backup: exact, unlike subtracting ``e`` (docs/design.md, "One step")."""
    if not params:
        return
    if not foreach:
        for p, b in zip(params, backups):
            p.copy_(b)
        return
    for _, idx in _buckets(params).items():
        torch._foreach_copy_([params[i] for i in idx], [backups[i] for i in idx])
