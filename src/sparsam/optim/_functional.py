"""Functional kernels of SAM / ASAM / SSAM: gradient norm, perturbation, restore.

Each kernel has a for-loop path (the ground truth, one tensor at a time) and a multi-tensor path
(``torch._foreach_*``) that performs the same elementwise operations in the same order, so the two
agree bitwise (tests pin this). On an accelerator nothing here synchronises with the host: scales
are 0-dim tensors and never leave the device.

The perturbation is one kernel, ``add_perturbation``: ``dst ← w + e`` reading ``w`` from ``src``.
SAM's step uses it two ways: with ``dst`` a spare buffer whose storage is then exchanged into
the parameter for pass 2 (``w`` is never copied, the restore is an exchange back), or, where a
parameter's storage must stay in place (FSDP2 shards, views into a flat buffer), with
``src`` a copy of ``w`` and ``dst`` the parameter (the restore copies ``w`` back).

On the CPU, where PyTorch has no multi-tensor kernels (``_foreach_*`` loops over tensors there),
``add_perturbation`` runs one fused kernel per tensor (``add`` with ``alpha``, or ``addcmul``
with the mask; float16/bfloat16 always ``addcmul``, whose scale is not rounded to the dtype),
reading the scale as a Python number (a CPU tensor: no device synchronisation) and writing no
temporary. Counted in reads and writes of a weight-sized tensor, SAM's extra work
is then 4 with the exchange (norm: read g; perturb: read w and g, write w + e) and 8 with the
copy (+ copy w, + copy it back), against 10 and a fresh temporary for the generic kernels. The
fused result equals the generic one to rounding (a fused multiply-add rounds once where the
generic kernels round ``e`` first); where a mask entry is False, ``dst`` gets ``w`` exactly
either way.

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
from typing import cast

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

    result: dict[int, Tensor] = {}  # every index is in one bucket
    for (_, dtype), idx in _buckets(grads).items():
        ps = [params[i] for i in idx]
        xs = [grads[i] for i in idx]
        if adaptive:
            t = torch._foreach_abs(ps)
            torch._foreach_add_(t, eta)
            xs = list(torch._foreach_mul(xs, t))
        sel = [j for j, i in enumerate(idx) if masks[i] is not None]
        sel_masks = [cast(Tensor, masks[idx[j]]) for j in sel]
        if sel:
            if not adaptive:  # do not write into the gradients themselves
                for j, m in zip(sel, sel_masks):
                    xs[j] = xs[j] * m
            else:
                torch._foreach_mul_([xs[j] for j in sel], sel_masks)
        norms = torch._foreach_norm(xs, 2, dtype=torch.float32 if dtype in _LOW_PRECISION else None)
        for i, n in zip(idx, norms):
            result[i] = n
    return [result[i] for i in range(len(grads))]


def global_norm(terms: Sequence[Tensor]) -> Tensor:
    """L2 norm of the per-tensor norms (on the first term's device, in the widest dtype)."""
    dev = terms[0].device
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in terms) else torch.float32
    return torch.linalg.vector_norm(torch.stack([t.to(dev, dtype) for t in terms]), 2)


def add_perturbation(
    srcs: Sequence[Tensor],
    grads: Sequence[Tensor],
    masks: Sequence[Tensor | None],
    dsts: Sequence[Tensor],
    scale: Tensor,
    *,
    adaptive: bool,
    eta: float,
    foreach: bool,
) -> None:
    """``dst ← w + e`` for every ``src`` holding ``w``, with ``e = scale · m ⊙ T² g`` and ``T`` from
    ``w`` (``dst`` may be a separate buffer, or hold a copy of ``w`` already; ``src`` is only read).

    Where a mask entry is False, ``e`` is ±0 and ``dst`` gets ``w``'s exact value.
    """
    if not srcs:
        return
    if not foreach:
        for w, g, m, d in zip(srcs, grads, masks, dsts):
            if w.device.type == "cpu" and FUSED_CPU:
                _add_perturbation_cpu([w], [g], [m], [d], scale, adaptive, eta)
                continue
            s = scale.to(w.device)
            if adaptive:
                t = w.abs().add_(eta)
                e = g * t
                e.mul_(t)
                e.mul_(s)
            else:
                e = g * s
            if m is not None:
                e.mul_(m)
            torch.add(w, e, out=d)
        return

    for (device, _), idx in _buckets(srcs).items():
        ws = [srcs[i] for i in idx]
        gs = [grads[i] for i in idx]
        if device.type == "cpu" and FUSED_CPU:
            _add_perturbation_cpu(ws, gs, [masks[i] for i in idx], [dsts[i] for i in idx], scale, adaptive, eta)
            continue
        s = scale.to(device)
        if adaptive:
            ts = torch._foreach_abs(ws)
            torch._foreach_add_(ts, eta)
            es = list(torch._foreach_mul(gs, ts))
            torch._foreach_mul_(es, ts)
            torch._foreach_mul_(es, s)
        else:
            es = list(torch._foreach_mul(gs, s))
        sel = [j for j, i in enumerate(idx) if masks[i] is not None]
        if sel:
            torch._foreach_mul_([es[j] for j in sel], [cast(Tensor, masks[idx[j]]) for j in sel])
        torch._foreach_add_(es, ws)  # e + w: IEEE addition commutes, so this is the loop's w + e
        torch._foreach_copy_([dsts[i] for i in idx], es)


# The CPU kernel of ``add_perturbation`` (tests switch it off to run the generic kernels on the CPU).
FUSED_CPU = True


def _add_perturbation_cpu(
    ws: Sequence[Tensor],
    gs: Sequence[Tensor],
    ms: Sequence[Tensor | None],
    ds: Sequence[Tensor],
    scale: Tensor,
    adaptive: bool,
    eta: float,
) -> None:
    """``add_perturbation`` on CPU tensors: one fused kernel per tensor writing ``dst`` directly."""
    s = float(scale)  # a CPU scalar: reading it costs no device synchronisation
    for w, g, m, d in zip(ws, gs, ms, ds):
        # A bool mask multiplies as uint8 (the same bytes): the CPU kernels convert uint8 to
        # float faster than bool.
        mu8 = None if m is None else m.view(torch.uint8)
        if adaptive:
            t = w.abs().add_(eta)
            t.mul_(t)
            if mu8 is not None:
                t.mul_(mu8)
            torch.addcmul(w, g, t, value=s, out=d)
        elif mu8 is None and w.dtype in _LOW_PRECISION:
            # add's alpha is rounded to float16/bfloat16 first (a bias of up to 2⁻⁹ on every e of
            # the tensor); addcmul's value is not
            torch.addcmul(w, g, torch.ones((), dtype=w.dtype), value=s, out=d)
        elif mu8 is None:
            torch.add(w, g, alpha=s, out=d)
        else:
            torch.addcmul(w, g, mu8, value=s, out=d)


def copy_(dsts: Sequence[Tensor], srcs: Sequence[Tensor], *, foreach: bool) -> None:
    """``dst.copy_(src)`` for every pair (multi-tensor where possible)."""
    if not srcs:
        return
    if not foreach:
        for d, w in zip(dsts, srcs):
            d.copy_(w)
        return
    for _, idx in _buckets(srcs).items():
        torch._foreach_copy_([dsts[i] for i in idx], [srcs[i] for i in idx])


def restore_(params: Sequence[Tensor], backups: Sequence[Tensor], *, foreach: bool) -> None:
    """Copy ``w`` back from its backup: exact, unlike subtracting ``e`` (docs/design.md, "One step")."""
    copy_(params, backups, foreach=foreach)
