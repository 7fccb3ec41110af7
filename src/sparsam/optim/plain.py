"""The plain step: one pass at ``w``, then the base optimizer's step. The only one there is.

A step without perturbation is written once, here, and counts its compute (one forward+backward
pass over the batch: 1.0). [`SAM`][sparsam.SAM] runs it for the steps a variant takes without an
ascent (``SAM._plain_step``: ``ScheduledSAM``'s off-steps, LookSAM's reuse steps, a variant of
one's own), and [`PlainStep`][sparsam.optim.plain.PlainStep] runs it for a plain optimizer
(``sparsam train --opt sgd``), so a method's ``compute`` means the same in every run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["PLAIN_PASS_COST", "PlainStep", "base_step", "plain_step"]

PLAIN_PASS_COST = 1.0
"""What a plain step's one pass costs, in forward+backward passes over the whole batch."""


class _Stepper(Protocol):
    """What [`plain_step`][sparsam.optim.plain.plain_step] uses of the object it steps."""

    _compute: float

    def _after_plain_pass(self) -> None: ...

    def _base_step(self, scaler: Any, before_base_step: Callable[[], Any] | None = None) -> None: ...


def enabled(grad_scaler: Any) -> Any:
    """``grad_scaler`` if it is an enabled GradScaler, else ``None``."""
    return grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None


def plain_step(
    stepper: _Stepper,
    closure: Callable[[], Any],
    *,
    grad_scaler: Any = None,
    before_base_step: Callable[[], Any] | None = None,
    base_step: bool = True,
) -> Any:
    """One step without perturbation: ``closure()`` once at ``w`` (``current_pass`` is ``None``: a
    clean pass whose gradient is all-reduced), one pass added to the compute, the stepper's
    ``_after_plain_pass`` hook, then (with ``base_step``) its base step: [unscale →] [clip →]
    [``before_base_step`` →] the base optimizer's step, through the GradScaler if one is enabled.
    Returns the closure's result."""
    with torch.enable_grad():
        loss = closure()
    stepper._compute += PLAIN_PASS_COST
    stepper._after_plain_pass()
    if base_step:
        with torch.no_grad():
            stepper._base_step(enabled(grad_scaler), before_base_step)
    return loss


def base_step(
    optimizer: Optimizer,
    param_groups: list[dict[str, Any]],
    *,
    scaler: Any = None,
    max_grad_norm: float | None = None,
    foreach: bool | None = None,
    before_base_step: Callable[[], Any] | None = None,
) -> None:
    """[unscale →] [clip the gradients of ``param_groups`` to ``max_grad_norm`` →]
    [``before_base_step()`` →] ``optimizer.step()`` (through ``scaler`` if given: it skips the step
    on an overflow). ``scaler`` is an enabled GradScaler or ``None``."""
    if scaler is not None and (max_grad_norm is not None or before_base_step is not None):
        scaler.unscale_(optimizer)
    if max_grad_norm is not None:
        params = [p for g in param_groups for p in g["params"] if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=foreach)
    if before_base_step is not None:
        before_base_step()
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()


class PlainStep:
    """A plain optimizer (``--opt sgd``) driven like [`SAM`][sparsam.SAM]: ``step(closure, ...)``
    is the [plain step][sparsam.optim.plain.plain_step] (the closure once, then [unscale, clip to
    ``max_grad_norm``,] the optimizer's step through the GradScaler), and
    [`compute`][sparsam.optim.plain.PlainStep.compute] counts its passes as SAM's does.

    Its closure contract (``sparsam.optim.passes.PassContract``) is SAM's for a plain pass: the
    whole batch, no per-sample losses, no ascent.

    Args:
        optimizer: the optimizer to step.
        max_grad_norm: clip the gradient to this global L2 norm before the step.
        compute: the compute already spent (a resumed run's steps so far: one pass each).
    """

    current_pass: str | None = None
    batch_fraction: float = 1.0
    batch_index: Tensor | None = None
    wants_sample_losses: bool = False
    selects_samples: bool = False

    def __init__(self, optimizer: Optimizer, *, max_grad_norm: float | None = None, compute: float = 0.0) -> None:
        # Not ``self.optimizer``: the pass helpers unwrap a framework's wrapper by that attribute.
        self.base_optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self._compute = float(compute)

    @property
    def compute(self) -> float:
        """Training compute so far in SGD-step equivalents: one per step."""
        return self._compute

    def ascends_next(self) -> bool:
        """Never: every step is a plain step."""
        return False

    @contextmanager
    def accumulation_pass(self) -> Iterator[None]:
        """A micro-batch run ahead of ``step``: at ``w``, nothing to set up."""
        yield

    def record_sample_losses(self, losses: Tensor) -> None:
        """Ignored, as by SAM: a plain pass selects no samples."""

    def _after_plain_pass(self) -> None:
        """Nothing between the pass and the step."""

    def _base_step(self, scaler: Any, before_base_step: Callable[[], Any] | None = None) -> None:
        base_step(
            self.base_optimizer,
            self.base_optimizer.param_groups,
            scaler=scaler,
            max_grad_norm=self.max_grad_norm,
            before_base_step=before_base_step,
        )

    def step(
        self,
        closure: Callable[[], Any],
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> Any:
        return plain_step(
            self, closure, grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step
        )
