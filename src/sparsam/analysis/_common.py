"""Shared machinery of the analysis tools: batches, parameters, buffers, random vectors.

Every tool evaluates one fixed function, the size-weighted mean loss over the batches it was given

    L(w) = sum_b (n_b / N) * L_b(w),   N = sum_b n_b,

where ``L_b = loss_fn(model(x_b), y_b)`` is the mean loss of batch ``b`` and ``n_b`` its number of
samples (``len(y_b)``; ``len(x_b)`` when the targets are not a tensor with a batch dimension). This
is the mean loss over all the samples, whatever the batch sizes.

The batches are read once (the first ``n_batches`` of one pass over ``data``), moved to the device
and reused for every evaluation, so a shuffling ``DataLoader`` still gives one fixed function.

Buffers: every forward runs through ``torch.func.functional_call`` with fresh copies of the
model's buffers, so BatchNorm running statistics (and ``num_batches_tracked``) are never written,
whatever the mode, and every forward sees the same buffer values. The mode (train/eval) is never
changed: in train mode BatchNorm normalises with the statistics of each batch, in eval mode with
the running statistics. The caller chooses.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .._checks import check_positive_int as check_positive_int  # re-exported for the analysis tools

LossFn = Callable[[Any, Any], Tensor]
GeneratorLike = torch.Generator | int | None


def check_nonnegative_float(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {name}={value!r}")
    if value < 0 or (positive and value == 0) or math.isinf(value):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {bound}, got {name}={value!r}")
    return float(value)


def make_generator(generator: GeneratorLike) -> torch.Generator:
    """A ``torch.Generator`` from a generator, an int seed, or ``None`` (seed 0).

    The default is a fixed seed rather than the global RNG, so the tools are reproducible and never
    consume the global random state of a training run.
    """
    if isinstance(generator, torch.Generator):
        return generator
    if generator is None:
        return torch.Generator().manual_seed(0)
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")
    return torch.Generator().manual_seed(generator)


def rademacher(n: int, gen: torch.Generator, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """n independent +-1 entries (drawn on the generator's device, then moved)."""
    z = torch.randint(0, 2, (n,), generator=gen, device=gen.device)
    return z.to(device=device, dtype=dtype).mul_(2).sub_(1)


def gaussian(n: int, gen: torch.Generator, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    z = torch.randn(
        n, generator=gen, device=gen.device, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    return z.to(device=device, dtype=dtype)


def resolve_params(model: nn.Module, params: Iterable[Tensor] | None, *, require_grad: bool = True) -> list[Tensor]:
    """The parameters the tool differentiates: ``params`` or every model parameter requiring grad
    (with ``require_grad=False``: every model parameter, for tools that only evaluate the loss)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params is None and not require_grad:
        return list(model.parameters())
    out: list[Tensor]
    if params is None:
        out = [p for p in model.parameters() if p.requires_grad]
        if not out:
            raise ValueError("the model has no parameter with requires_grad=True")
        return out
    out = list(params)
    if not out:
        raise ValueError("params is empty: give at least one parameter tensor")
    seen: set[int] = set()
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] must be a tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
        if id(p) in seen:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is given twice")
        seen.add(id(p))
    return out


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _batch_size(inputs: Any, targets: Any, index: int) -> int:
    for x in (targets, inputs):
        if isinstance(x, Tensor) and x.dim() >= 1:
            return int(x.shape[0])
    for x in (targets, inputs):
        if isinstance(x, (list, tuple)) and x and isinstance(x[0], Tensor) and x[0].dim() >= 1:
            return int(x[0].shape[0])
    raise ValueError(
        f"batch {index}: cannot tell its size (neither targets nor inputs is a tensor with a batch dimension)"
    )


def collect_batches(data: Any, *, device: torch.device, n_batches: int | None) -> list[tuple[Any, Any, int]]:
    """Read the first ``n_batches`` ``(inputs, targets)`` batches of one pass over ``data``.

    A single ``(inputs, targets)`` pair of tensors is accepted as one batch.
    """
    if n_batches is not None:
        check_positive_int("n_batches", n_batches)
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        data = [data]
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"data must be an iterable of (inputs, targets) batches, got {type(data).__name__}") from None
    batches: list[tuple[Any, Any, int]] = []
    for i, batch in enumerate(iterator):
        if n_batches is not None and i >= n_batches:
            break
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"batch {i} must be an (inputs, targets) pair, got {type(batch).__name__}")
        inputs, targets = batch
        size = _batch_size(inputs, targets, i)
        if size == 0:
            raise ValueError(f"batch {i} is empty (0 samples)")
        batches.append((_to_device(inputs, device), _to_device(targets, device), size))
    if not batches:
        raise ValueError("data is empty: it yielded no (inputs, targets) batch")
    return batches


class Objective:
    """The mean loss ``L(w)`` of a model over fixed batches, with its gradient and Hessian products.

    Args:
        cache_graph: keep the graph of the gradient ``g = dL/dw`` (built once with
            ``create_graph=True``) and compute every Hessian-vector product as one double-backward
            through it. Saves a forward and a backward per product; costs the memory of the graphs
            of all batches. ``None``: cache when there is a single batch. Only valid while the
            weights do not change.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        data: Any,
        *,
        params: Iterable[Tensor] | None = None,
        device: torch.device | str | None = None,
        n_batches: int | None = None,
        cache_graph: bool | None = None,
        require_grad: bool = True,
    ) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn
        self.params = resolve_params(model, params, require_grad=require_grad)
        if device is None:
            device = self.params[0].device if self.params else torch.device("cpu")
        self.device = torch.device(device)
        self.batches = collect_batches(data, device=self.device, n_batches=n_batches)
        total = sum(size for _, _, size in self.batches)
        self.weights = [size / total for _, _, size in self.batches]
        self.cache_graph = len(self.batches) == 1 if cache_graph is None else bool(cache_graph)
        self.shapes = [p.shape for p in self.params]
        self.numels = [p.numel() for p in self.params]
        self.numel = sum(self.numels)
        dtypes = {p.dtype for p in self.params}
        self.dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
        self._buffer_names = [name for name, _ in model.named_buffers()]
        self._grad_graph: list[Tensor | None] | None = None
        self._batched_failed = False
        self.n_hvp = 0

    # -- forward -------------------------------------------------------------------------------
    def batch_loss(self, index: int) -> Tensor:
        """Mean loss of batch ``index`` at the current weights, buffers left untouched."""
        inputs, targets, _ = self.batches[index]
        if self._buffer_names:
            buffers = dict(self.model.named_buffers())
            copies = {name: buffers[name].clone() for name in self._buffer_names}
            outputs = functional_call(self.model, copies, (inputs,))
        else:
            outputs = self.model(inputs)
        loss = self.loss_fn(outputs, targets)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return the mean loss of the batch as a scalar tensor, got {shape}")
        return loss.reshape(())

    def loss(self) -> float:
        """``L(w)`` at the current weights (no graph)."""
        with torch.no_grad():
            total = sum(w * self.batch_loss(i).double() for i, w in enumerate(self.weights))
        return float(total)  # one host sync per evaluation

    def loss_and_grad(self) -> tuple[float, list[Tensor]]:
        """``L(w)`` and ``dL/dw`` (one forward and backward per batch)."""
        grads = [torch.zeros_like(p) for p in self.params]
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, w in enumerate(self.weights):
            loss = self.batch_loss(i)
            gs = torch.autograd.grad(loss * w, self.params, allow_unused=True)
            for acc, g in zip(grads, gs):
                if g is not None:
                    acc.add_(g)
            total += w * loss.detach().double()
        return float(total), grads

    # -- Hessian-vector products ---------------------------------------------------------------
    def _gradient_with_graph(self, index: int | None) -> list[Tensor | None]:
        if index is None:
            terms = [w * self.batch_loss(i) for i, w in enumerate(self.weights)]
            loss = sum(terms[1:], terms[0])
        else:
            loss = self.weights[index] * self.batch_loss(index)
        gs = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        return [g if g is not None and g.requires_grad else None for g in gs]

    @staticmethod
    def _double_backward(
        gs: list[Tensor | None], params: list[Tensor], vs: Sequence[Tensor], retain: bool, batched: bool = False
    ) -> list[Tensor | None]:
        live = [(i, g) for i, g in enumerate(gs) if g is not None]
        if not live:
            return [None] * len(params)
        out = torch.autograd.grad(
            [g for _, g in live],
            params,
            grad_outputs=[vs[i].to(g.dtype) for i, g in live],
            retain_graph=retain,
            allow_unused=True,
            is_grads_batched=batched,
        )
        return list(out)

    def _products(self, vs: Sequence[Tensor], batched: bool) -> list[Tensor]:
        if self.cache_graph:
            if self._grad_graph is None:
                self._grad_graph = self._gradient_with_graph(None)
            parts: Iterable[list[Tensor | None]] = [
                self._double_backward(self._grad_graph, self.params, vs, retain=True, batched=batched)
            ]
        else:
            parts = (
                self._double_backward(self._gradient_with_graph(i), self.params, vs, retain=False, batched=batched)
                for i in range(len(self.batches))
            )
        result: list[Tensor | None] = [None] * len(self.params)
        for hv in parts:
            for j, h in enumerate(hv):
                if h is not None:
                    r = result[j]
                    result[j] = h if r is None else r.add_(h)
        lead = (vs[0].shape[0],) if batched else ()
        return [
            r if r is not None else torch.zeros(lead + tuple(p.shape), dtype=p.dtype, device=p.device)
            for r, p in zip(result, self.params)
        ]

    def hvp(self, vs: Sequence[Tensor]) -> list[Tensor]:
        """``H v`` for ``v`` given as one tensor per parameter (Pearlmutter's R-operator via
        double backward: ``H v = d/dw (g(w) . v)``, with ``g`` built with ``create_graph=True``)."""
        self.n_hvp += 1
        return self._products(vs, batched=False)

    def hvp_batched_flat(self, V: Tensor) -> Tensor:
        """``(H v_1, ..., H v_B)`` for the rows of ``V`` (B, n), in one vectorised double backward
        (``is_grads_batched``, i.e. ``vmap`` over the backward pass). Falls back to one product per
        row where an operation has no batching rule."""
        B = V.shape[0]
        if B > 1 and not self._batched_failed:
            vs = [
                part.reshape((B,) + tuple(shape))
                for part, shape in zip(torch.split(V, self.numels, dim=1), self.shapes)
            ]
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # vmap's "performance drop" notes
                    out = self._products(vs, batched=True)
                self.n_hvp += B
                return torch.cat([t.reshape(B, -1).to(self.dtype) for t in out], dim=1)
            except RuntimeError:
                self._batched_failed = True
                self.release()
        return torch.stack([self.hvp_flat(v) for v in V])

    def hvp_flat(self, v: Tensor) -> Tensor:
        vs = [part.view(shape) for part, shape in zip(torch.split(v, self.numels), self.shapes)]
        return self.flatten(self.hvp(vs))

    def release(self) -> None:
        """Drop the cached gradient graph."""
        self._grad_graph = None

    # -- flat vectors --------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])


class WeightGuard:
    """Context manager: saves the given parameters and restores them bitwise on exit (also on error)."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.saved: list[Tensor] = []

    def __enter__(self) -> WeightGuard:
        with torch.no_grad():
            self.saved = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)
        weights_changed()

    def set(self, *terms: tuple[float, Sequence[Tensor]]) -> None:
        """Set the weights in place to ``w0 + sum_i c_i d_i`` for ``terms = ((c_1, d_1), ...)``,
        computed afresh from the saved ``w0`` (no drift across calls)."""
        with torch.no_grad():
            for j, (p, s) in enumerate(zip(self.params, self.saved)):
                p.copy_(s)
                for coeff, direction in terms:
                    if coeff != 0.0:
                        p.add_(direction[j].to(p.dtype), alpha=coeff)
        weights_changed()


def weights_changed() -> None:
    """Call after changing weights in place: inside a ``torch.autocast`` region the next forward
    would otherwise reuse autocast's cached low-precision casts of the old values (the cache is
    keyed by the tensor, not its contents), and every point would be evaluated at the first."""
    torch.clear_autocast_cache()
