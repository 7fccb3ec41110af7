"""The closure contract of [`SAM.step`][sparsam.SAM.step] for a loss function that sees a batch.

[`pass_batch`][sparsam.integrations.pass_batch] gives the part of the batch the current pass uses
(a sub-batch ascent, ESAM's data selection) and [`pass_loss`][sparsam.integrations.pass_loss]
the loss to backpropagate, handing ESAM the per-sample losses it records. This is the one
implementation: the engine of ``sparsam train`` and every framework integration call it, and
``sparsam.integrations`` exports it under the same names. Only torch; no framework is imported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from .sam import ASCENT, DESCENT, MEASURE, SAM, PassKind

__all__ = ["ASCENT", "DESCENT", "MEASURE", "PassContract", "PassKind", "pass_batch", "pass_loss", "unwrap_optimizer"]

# Attribute under which each framework's optimizer wrapper keeps the wrapped optimizer:
# Accelerate's AcceleratedOptimizer (.optimizer), Lightning's LightningOptimizer (._optimizer).
_WRAPPER_ATTRS = ("optimizer", "_optimizer")


@runtime_checkable
class PassContract(Protocol):
    """What a closure reads from the optimizer that calls it: [`SAM`][sparsam.SAM] and its
    subclasses, and the plain optimizer of ``sparsam train`` (``--opt sgd``), which runs one pass."""

    @property
    def current_pass(self) -> PassKind | None: ...

    @property
    def batch_fraction(self) -> float: ...

    @property
    def batch_index(self) -> Tensor | None: ...

    @property
    def wants_sample_losses(self) -> bool: ...

    @property
    def selects_samples(self) -> bool: ...

    def record_sample_losses(self, losses: Tensor) -> None: ...

    def ascends_next(self) -> bool: ...

    def accumulation_pass(self) -> AbstractContextManager[None]: ...


def _unwrap(optimizer: Any) -> Any:
    """The object inside a framework's optimizer wrappers (``optimizer`` itself without one)."""
    obj = optimizer
    for _ in range(8):  # wrappers of wrappers (Accelerate around DeepSpeed, ...): a few levels at most
        attrs = getattr(obj, "__dict__", {})
        inner = next((attrs[a] for a in _WRAPPER_ATTRS if a in attrs), None)
        if inner is None:
            break
        # A LightningOptimizer's class is a dynamic subclass of the wrapped optimizer's class, so
        # isinstance(wrapper, SAM) is true: unwrap by attribute, never by isinstance.
        obj = inner
    return obj


def _no_sam(optimizer: Any) -> TypeError:
    return TypeError(f"no sparsam SAM/SSAM optimizer found inside {type(optimizer).__name__}")


def unwrap_optimizer(optimizer: Any) -> SAM:
    """The [`SAM`][sparsam.SAM] (or [`SSAM`][sparsam.SSAM]) inside a framework's optimizer wrapper.

    ``accelerator.prepare`` returns an ``AcceleratedOptimizer`` and Lightning hands out a
    ``LightningOptimizer``; neither exposes ``first_step`` / ``second_step`` safely (the first has
    no such attribute, the second would run them against its own copy of the attributes). Call them
    on the object this returns. A SAM optimizer is returned as it is.

    Raises:
        TypeError: if no SAM optimizer is found inside ``optimizer``.
    """
    obj = _unwrap(optimizer)
    if not isinstance(obj, SAM):
        raise _no_sam(optimizer)
    return obj


def _contract(optimizer: Any) -> PassContract:
    """The object whose pass a closure runs: a SAM optimizer (unwrapped from a framework's
    wrapper), or another object that implements the contract (the engine's plain optimizer)."""
    obj = _unwrap(optimizer)
    if not isinstance(obj, (SAM, PassContract)):
        raise _no_sam(optimizer)
    return obj


def _batch_size(batch: Any) -> int | None:
    """The first dimension of the first tensor in ``batch`` (a tensor, or a tuple / list / dict of
    them, nested), ``None`` without a tensor."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else None
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        n = _batch_size(item)
        if n is not None:
            return n
    return None


def _take(batch: Any, index: Tensor | None = None, fraction: float = 1.0, *, n: int | None = None) -> Any:
    """``batch`` with every tensor whose first dimension is the batch size ``n`` cut to the
    samples ``index`` (if given), then to the first ``ceil(fraction · m)`` of the m left; other
    leaves are passed unchanged. Tuples (named ones too), lists and dicts keep their type."""
    if index is None and fraction >= 1.0:
        return batch
    n = _batch_size(batch) if n is None else n
    if n is None:
        raise TypeError(
            f"the batch ({type(batch).__name__}) holds no tensor with a batch dimension to cut for this pass "
            "(a sub-batch ascent or ESAM's data selection)"
        )
    m = n if index is None else int(index.numel())
    keep = m if fraction >= 1.0 else math.ceil(fraction * m)

    def cut(t: Any) -> Any:
        if isinstance(t, Tensor):
            if t.dim() == 0 or t.shape[0] != n:
                return t
            if index is not None:
                t = t[index.to(t.device)]
            return t[:keep] if keep < m else t
        if isinstance(t, Mapping):
            d = {k: cut(v) for k, v in t.items()}
            if isinstance(t, defaultdict):  # its constructor takes the default factory first
                return type(t)(t.default_factory, d)
            return d if type(t) is dict else type(t)(d)  # type: ignore[call-arg]  # a Mapping subclass rebuilt from a dict, as dict(d) is
        if isinstance(t, tuple):
            parts = [cut(v) for v in t]
            return type(t)(*parts) if hasattr(t, "_fields") else tuple(parts)
        if isinstance(t, list):
            return [cut(v) for v in t]
        return t

    return cut(batch)


def pass_batch(optimizer: Any, batch: Any) -> Any:
    """The part of ``batch`` the current pass of a SAM-family optimizer uses.

    ``batch`` is a tensor, or a tuple / list / dict (nested) of them; every tensor whose first
    dimension is the batch size (that of the first tensor found) is cut, other values pass
    unchanged. In ESAM's descent pass that is the samples
    [`batch_index`][sparsam.SAM.batch_index] names; in the ascent pass of a sub-batch ascent
    (``ascent_fraction``) the first ``ceil(f · n)`` samples
    ([`batch_fraction`][sparsam.SAM.batch_fraction]); otherwise the whole batch, unchanged.
    ``optimizer`` may be a framework's wrapper (Lightning's ``self.optimizers()``), or any object
    with the contract's attributes (the plain optimizer of ``sparsam train``: always the whole batch).
    """
    sam = _contract(optimizer)
    return _take(batch, sam.batch_index, sam.batch_fraction)


def pass_loss(optimizer: Any, losses: Tensor) -> Tensor:
    """The loss to backpropagate in the current pass, from the per-sample losses of the samples
    [`pass_batch`][sparsam.integrations.pass_batch] gave (``reduction="none"``): their mean. While
    the optimizer wants them ([`wants_sample_losses`][sparsam.SAM.wants_sample_losses]: ESAM's
    data selection, in its ascent and its forward-only ``"measure"`` pass) they are handed to
    [`record_sample_losses`][sparsam.SAM.record_sample_losses] first.

    A 0-d loss (already reduced) is returned as it is, unless the optimizer wants per-sample
    losses: then a ``RuntimeError`` says so.
    """
    sam = _contract(optimizer)
    if not isinstance(losses, Tensor):
        raise TypeError(f"pass_loss needs a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() == 0:
        if sam.wants_sample_losses:
            raise RuntimeError(
                f"{sam!r} selects samples by their losses, but the "
                "loss is already reduced to one number: compute it with reduction='none' (one loss per sample)"
            )
        return losses
    if losses.dim() != 1:
        raise ValueError(f"pass_loss needs one loss per sample (a 1-D tensor), got shape {tuple(losses.shape)}")
    if sam.wants_sample_losses:
        sam.record_sample_losses(losses)
    return losses.mean()
