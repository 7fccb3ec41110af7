"""Loss landscapes: 1-D and 2-D slices along filter-normalised random directions, and the linear
interpolation between two checkpoints.

Reference:
    H. Li, Z. Xu, G. Taylor, C. Studer, T. Goldstein, "Visualizing the loss landscape of neural
    nets", NeurIPS 2018.
    I. Goodfellow, O. Vinyals, A. Saxe, "Qualitatively characterizing neural network optimization
    problems", ICLR 2015 (linear interpolation).

Every evaluation is the size-weighted mean loss over the batches given. The weights are set in
place under ``torch.no_grad`` (no model
is rebuilt or copied) and restored bitwise at the end, also on error; buffers are never written;
the mode is never changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ._common import GeneratorLike, LossFn, Objective, WeightGuard, make_generator, resolve_params, weights_changed

__all__ = [
    "filter_normalize",
    "linear_interpolation",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "random_direction",
]

OneD = Literal["zero", "copy", "filter"]
_ONE_D = ("zero", "copy", "filter")


def _check_one_d(one_d: str) -> None:
    if one_d not in _ONE_D:
        raise ValueError(f"one_d must be one of {_ONE_D}, got one_d={one_d!r}")


def filter_normalize(direction: Sequence[Tensor], weights: Sequence[Tensor], *, one_d: OneD = "zero") -> list[Tensor]:
    """Filter normalisation of Li et al. (2018), returning a new direction.

    For a parameter with at least 2 dimensions, each *filter* — the slice ``d[i]`` along the first
    dimension: an output channel of a convolution ``(C_out, C_in, kh, kw)``, a row (one output
    unit) of a linear weight ``(out, in)`` — is rescaled to the norm of the same filter of the
    weights:

    ```text
    d_i ← d_i / ‖d_i‖ · ‖w_i‖
    ```

    (a filter with ``d_i = 0`` stays 0; a filter with ``w_i = 0`` becomes 0). Parameters with at
    most 1 dimension (biases, BatchNorm/LayerNorm scales and shifts) follow ``one_d``:

    - ``"zero"`` (default): the direction is 0 there, these parameters stay fixed (Li et al.'s
      ``--xignore biasbn``, used for their figures);
    - ``"copy"``: ``d = w`` (Li et al.'s code without ``--xignore``);
    - ``"filter"``: each scalar is its own filter, ``d_i = sign(d_i) |w_i|``.
    """
    _check_one_d(one_d)
    if len(direction) != len(weights):
        raise ValueError(f"direction has {len(direction)} tensors but weights has {len(weights)}")
    out: list[Tensor] = []
    for i, (d, w) in enumerate(zip(direction, weights)):
        if d.shape != w.shape:
            raise ValueError(f"direction[{i}] has shape {tuple(d.shape)}, its weight {tuple(w.shape)}")
        w = w.detach()
        if d.dim() <= 1:
            if one_d == "zero":
                out.append(torch.zeros_like(d))
            elif one_d == "copy":
                out.append(w.clone().to(d.dtype))
            else:
                out.append(torch.sign(d) * w.abs().to(d.dtype))
            continue
        d2 = d.reshape(d.shape[0], -1)
        w2 = w.reshape(w.shape[0], -1).to(d.dtype)
        dn = d2.norm(dim=1, keepdim=True)
        scale = torch.where(
            dn > 0, w2.norm(dim=1, keepdim=True) / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn)
        )
        out.append((d2 * scale).reshape(d.shape))
    return out


def random_direction(
    model: nn.Module,
    *,
    generator: GeneratorLike = None,
    params: Iterable[Tensor] | None = None,
    normalize: bool = True,
    one_d: OneD = "zero",
) -> list[Tensor]:
    """A Gaussian random direction in parameter space, filter-normalised by default.

    Entries are i.i.d. standard normal, drawn on the generator (CPU by default, so the direction
    does not depend on the device) with one tensor per parameter of ``params`` (default: every
    parameter with ``requires_grad``), in that order; then
    [`filter_normalize`][sparsam.analysis.filter_normalize] with ``one_d``
    unless ``normalize=False``.
    """
    _check_one_d(one_d)
    ps = resolve_params(model, params)
    gen = make_generator(generator)
    direction = []
    for p in ps:
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        d = torch.randn(p.shape, generator=gen, device=gen.device, dtype=dtype)
        direction.append(d.to(device=p.device, dtype=p.dtype))
    return filter_normalize(direction, ps, one_d=one_d) if normalize else direction


def _default_grid(
    values: Sequence[float] | Tensor | np.ndarray | None, lo: float, hi: float, n: int, name: str
) -> list[float]:
    if values is None:
        return np.linspace(lo, hi, n).tolist()
    out = [float(a) for a in (values.tolist() if hasattr(values, "tolist") else values)]
    if not out:
        raise ValueError(f"{name} is empty: give at least one coefficient")
    return out


def _check_direction(direction: Sequence[Tensor], params: Sequence[Tensor], name: str) -> list[Tensor]:
    direction = list(direction)
    if len(direction) != len(params):
        raise ValueError(f"{name} has {len(direction)} tensors but there are {len(params)} parameters")
    for i, (d, p) in enumerate(zip(direction, params)):
        if not isinstance(d, Tensor) or d.shape != p.shape:
            got = tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__
            raise ValueError(f"{name}[{i}] must have its parameter's shape {tuple(p.shape)}, got {got}")
    return [d.detach().to(device=p.device, dtype=p.dtype) for d, p in zip(direction, params)]


def loss_landscape_1d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    direction: Sequence[Tensor] | None = None,
    alphas: Sequence[float] | None = None,
    generator: GeneratorLike = None,
    normalize: bool = True,
    one_d: OneD = "zero",
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> dict[str, list[float]]:
    """The loss along one direction: ``f(α) = L(w + α d)`` (Li et al. 2018).

    Args:
        direction: one tensor per parameter of ``params``, used as given; default
            ``random_direction(model, generator=generator, params=params, normalize=normalize,
            one_d=one_d)``.
        alphas: the coefficients (default 41 points from -1 to 1).
        model, loss_fn, data, params, device, n_batches: as in
            [`hessian_vector_product`][sparsam.analysis.hessian_vector_product].

    Returns:
        ``{"alphas": [...], "losses": [...]}`` (plain floats).
    """
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches)
    grid = _default_grid(alphas, -1.0, 1.0, 41, "alphas")
    if direction is None:
        direction = random_direction(model, generator=generator, params=obj.params, normalize=normalize, one_d=one_d)
    d = _check_direction(direction, obj.params, "direction")
    losses: list[float] = []
    with WeightGuard(obj.params) as guard:
        for a in grid:
            guard.set((a, d))
            losses.append(obj.loss())
    return {"alphas": grid, "losses": losses}


def loss_landscape_2d(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    directions: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
    alphas: Sequence[float] | None = None,
    betas: Sequence[float] | None = None,
    generator: GeneratorLike = None,
    normalize: bool = True,
    one_d: OneD = "zero",
    params: Iterable[Tensor] | None = None,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> dict[str, Any]:
    """The loss on a plane: ``f(α, β) = L(w + α d₁ + β d₂)`` (Li et al. 2018).

    The two default directions are independent draws of
    [`random_direction`][sparsam.analysis.random_direction] from
    ``generator`` (nearly orthogonal in high dimension, as in Li et al.).

    Args:
        directions: ``(d1, d2)``, each one tensor per parameter, used as given.
        alphas, betas: the coefficients along ``d1`` and ``d2`` (default 21 points from -1 to 1).

    Returns:
        ``{"alphas": [...], "betas": [...], "losses": [[...], ...]}`` with
        ``losses[i][j] = L(w + alphas[i] d1 + betas[j] d2)`` (rows follow ``alphas``).
    """
    obj = Objective(model, loss_fn, data, params=params, device=device, n_batches=n_batches)
    agrid = _default_grid(alphas, -1.0, 1.0, 21, "alphas")
    bgrid = _default_grid(betas, -1.0, 1.0, 21, "betas")
    pair: Sequence[Sequence[Tensor]]
    if directions is None:
        gen = make_generator(generator)
        pair = [
            random_direction(model, generator=gen, params=obj.params, normalize=normalize, one_d=one_d)
            for _ in range(2)
        ]
    else:
        pair = directions
    if len(pair) != 2:
        raise ValueError(f"directions must be a pair (d1, d2), got {len(pair)} directions")
    d1 = _check_direction(pair[0], obj.params, "directions[0]")
    d2 = _check_direction(pair[1], obj.params, "directions[1]")
    losses: list[list[float]] = []
    with WeightGuard(obj.params) as guard:
        for a in agrid:
            row = []
            for b in bgrid:
                guard.set((a, d1), (b, d2))
                row.append(obj.loss())
            losses.append(row)
    return {"alphas": agrid, "betas": bgrid, "losses": losses}


def _state_tensors(state: Mapping[str, Tensor] | nn.Module, name: str) -> Mapping[str, Tensor]:
    if isinstance(state, nn.Module):
        return state.state_dict()
    if not isinstance(state, Mapping):
        raise TypeError(f"{name} must be a state dict (name -> tensor) or a module, got {type(state).__name__}")
    return state


def linear_interpolation(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    start: Mapping[str, Tensor] | nn.Module,
    end: Mapping[str, Tensor] | nn.Module,
    *,
    alphas: Sequence[float] | None = None,
    interpolate_buffers: bool = False,
    device: torch.device | str | None = None,
    n_batches: int | None = None,
) -> dict[str, list[float]]:
    """The loss on the line through two checkpoints: ``f(α) = L((1 − α) θ₀ + α θ₁)``
    (Goodfellow et al. 2015), so ``α = 0`` is ``start`` and ``α = 1`` is ``end``.

    Every parameter of ``model`` is interpolated (keys of ``model.named_parameters()``, which must
    be in both state dicts with the same shapes). Buffers: by default the model's own buffers are
    used unchanged at every point (in train mode BatchNorm uses batch statistics, so they do not
    matter); with ``interpolate_buffers=True`` floating-point buffers (e.g. BatchNorm running
    mean and variance, relevant in eval mode) are interpolated too, integer buffers
    (``num_batches_tracked``) are kept. Parameters and buffers are restored bitwise at the end.

    Args:
        start, end: state dicts (or modules, whose ``state_dict()`` is used).
        alphas: the coefficients (default 41 points from -0.5 to 1.5).

    Returns:
        ``{"alphas": [...], "losses": [...]}``.
    """
    s0 = _state_tensors(start, "start")
    s1 = _state_tensors(end, "end")
    named: list[tuple[str, Tensor]] = list(model.named_parameters())
    if interpolate_buffers:
        named += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for key, t in named:
        for label, s in (("start", s0), ("end", s1)):
            if key not in s:
                raise ValueError(f"{label} has no entry {key!r}")
            if tuple(s[key].shape) != tuple(t.shape):
                raise ValueError(f"{label}[{key!r}] has shape {tuple(s[key].shape)}, the model's is {tuple(t.shape)}")
    grid = _default_grid(alphas, -0.5, 1.5, 41, "alphas")
    obj = Objective(model, loss_fn, data, device=device, n_batches=n_batches, require_grad=False)
    tensors = [t for _, t in named]
    theta0 = [s0[k].detach().to(device=t.device, dtype=t.dtype) for k, t in named]
    theta1 = [s1[k].detach().to(device=t.device, dtype=t.dtype) for k, t in named]
    losses: list[float] = []
    with WeightGuard(tensors):
        for a in grid:
            with torch.no_grad():
                for t, x0, x1 in zip(tensors, theta0, theta1):
                    # torch.lerp: x0 + a (x1 - x0), exactly x0 at a = 0
                    t.copy_(torch.lerp(x0, x1, a))
            weights_changed()
            losses.append(obj.loss())
    return {"alphas": grid, "losses": losses}
