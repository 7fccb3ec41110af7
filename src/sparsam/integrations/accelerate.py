"""SAM and SSAM in Hugging Face Accelerate loops (and the ``transformers`` ``Trainer``):
[`SAMStep`][sparsam.integrations.accelerate.SAMStep].

```python
opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
model, opt, loader = accelerator.prepare(model, opt, loader)
sam_step = SAMStep(accelerator, opt, model=model)
for x, y in loader:
    with accelerator.accumulate(model):
        loss = sam_step(compute_loss, x, y)     # compute_loss(x, y) -> the batch's mean loss
        scheduler.step()
```

Why a helper (each point is tested against the plain two-step loop):

* ``accelerator.prepare`` wraps the optimizer in an ``AcceleratedOptimizer``, which has no
  ``first_step`` / ``second_step`` attribute (use
  [`unwrap_optimizer`][sparsam.integrations.unwrap_optimizer],
  or the SAM object you prepared: it is the same object).
* ``prepared.step(closure)`` reaches ``SAM.step(closure)`` and is correct in float32 and bf16
  without accumulation. Under fp16 Accelerate steps through ``GradScaler.step(optimizer, closure)``,
  and the GradScaler does not support closures: it fails (it has no scale yet, or no gradients to
  check), and if it did not, ``SAM.step`` would run without the scaler and step on scaled gradients.
* Gradient accumulation runs every micro-batch through ``backward`` and steps once, at the end;
  SAM needs every micro-batch in *both* passes: the ascent gradient of the whole batch decides
  the perturbation, and the descent gradient of the whole batch at ``w + e`` is what the base
  optimizer steps on. [`SAMStep`][sparsam.integrations.accelerate.SAMStep] runs pass 1 of each
  micro-batch as it arrives (the ascent gradients accumulate), keeps the micro-batch's arguments (not
  its activations), and when Accelerate says the gradients sync (``accelerator.sync_gradients``)
  perturbs, runs pass 2 over every kept micro-batch (all-reducing only in the last one under DDP) and
  steps: exactly SAM on the whole batch, with the loss Accelerate scales by ``1 /
  gradient_accumulation_steps``.
* Cheaper SAMs (``docs/variants.md``): ``SAMStep`` cuts ``compute_loss``'s tensor arguments to the
  samples of each pass (sub-batch ascent, ESAM's selected samples) and, when ``compute_loss``
  returns per-sample losses, hands them to ESAM's data selection, across the accumulation window.
* Sharded training: Accelerate's FSDP plugin with ``fsdp_version=2`` (``fully_shard``) works
  unchanged: ``prepare`` gives the optimizer DTensor parameters, which SAM and SSAM step shard by
  shard (``docs/scaling.md``), and ``accumulate`` skips the reduce-scatter of the early
  micro-batches as ``SAMStep`` needs. Refused with an error that says why: ``fsdp_version=1``
  (FSDP1 hands the optimizer each rank's slice of the flattened parameters as plain tensors, so no
  rank can form the norm over all shards), DeepSpeed (``accelerator.backward`` takes the engine's
  optimizer step) and Megatron-LM (``accelerator.backward`` does nothing; the engine runs the step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

from torch import Tensor, nn

from ..optim.passes import DESCENT, MEASURE
from . import _batch_size, _split_index, _sum_for_selection, _take, pass_loss, unwrap_optimizer

__all__ = ["SAMStep"]


def _call(
    fn: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any], n: int | None, index: Any, fraction: float
) -> Tensor:
    """``fn`` on the part of its arguments a pass uses (``sparsam.integrations._take``)."""
    if index is not None or fraction < 1.0:
        args, kwargs = _take((args, kwargs), index, fraction, n=n)
    out = fn(*args, **kwargs)
    if not isinstance(out, Tensor) or out.dim() > 1:
        raise TypeError(
            "compute_loss must return the loss (a 0-d tensor) or one loss per sample (a 1-D tensor, "
            f"reduction='none'), got {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, Tensor) else "")
        )
    return out


# Accelerate's distributed types SAMStep cannot run, and why (checked in Accelerate 1.15).
_REFUSED = {
    "DEEPSPEED": (
        "under DeepSpeed, accelerator.backward runs DeepSpeed's engine.backward and then engine.step() (the "
        "optimizer step, clipping and zero_grad) on every backward that ends an accumulation window, so the "
        "weights would move after pass 1, before SAM perturbs them"
    ),
    "MEGATRON_LM": (
        "under Megatron-LM, accelerator.backward does nothing (Megatron's engine runs forward, backward and "
        "the optimizer step in one train_step), so there are no two passes for SAM to drive"
    ),
    "FSDP": (
        "Accelerate's FSDP plugin with fsdp_version=1 wraps the model in FSDP1, which hands the optimizer each "
        "rank's slice of the flattened parameters as plain tensors, so SAM cannot form the perturbation norm "
        "over all shards (every rank would perturb with the norm of its own slice) and SSAM cannot choose its "
        "masks over the full parameters. Use FullyShardedDataParallelPlugin(fsdp_version=2) (FSDP2, "
        "fully_shard: DTensor parameters, which SAM and SSAM step)"
    ),
}


def _check_distributed(accelerator: Any) -> None:
    kind = getattr(accelerator, "distributed_type", None)
    name = str(getattr(kind, "value", kind))
    if name == "FSDP" and getattr(accelerator, "is_fsdp2", False):
        return  # FSDP2: DTensor parameters
    if name in _REFUSED:
        raise ValueError(
            f"SAMStep cannot run SAM here: {_REFUSED[name]}. For sharded training use FSDP2 "
            "(see docs/frameworks.md and docs/scaling.md)"
        )


class SAMStep:
    """One SAM / SSAM step per call in an Accelerate loop: both passes, accumulation, fp16/bf16, DDP.

    ``sam_step(compute_loss, *args, **kwargs)`` calls ``compute_loss(*args, **kwargs)`` (it must
    return the mean loss of that (micro-)batch, or one loss per sample (``reduction="none"``), and
    do nothing else: no ``backward``), backpropagates it (the mean of per-sample losses) with
    ``accelerator.backward`` at ``w`` and returns it detached. On the call that completes an
    accumulation window (``accelerator.sync_gradients``, always true without ``accumulate``) it then
    perturbs ([`first_step`][sparsam.SAM.first_step], which unscales under fp16), calls ``compute_loss``
    again for every micro-batch of the window at ``w + e`` with the same arguments, restores ``w``
    and, with ``base_step=True``, takes the base step (``scaler.step`` + ``scaler.update`` under
    fp16). Gradients are cleared when a window starts; don't call ``optimizer.step()`` yourself.
    A one-pass optimizer ([`MSAM`][sparsam.optim.msam.MSAM]) calls ``compute_loss`` once per
    micro-batch, every micro-batch of the window at the step's perturbed weights.

    Each pass gets the part of the arguments it uses: every tensor argument whose first dimension
    is the batch size (that of the first tensor argument) is cut with
    [`pass_batch`][sparsam.integrations.pass_batch]'s rule, so a sub-batch ascent
    (``ascent_fraction``) costs its fraction, and ESAM's data selection (``gamma < 1``) works when
    ``compute_loss`` returns per-sample losses: they are recorded at ``w`` (every micro-batch of
    the window) and in ESAM's forward-only pass at ``w + e``, and pass 2 runs on the selected
    samples of each micro-batch, weighted so that the window's descent gradient is the mean over
    the selected ones. ``compute_loss`` itself does not read ``batch_fraction`` or ``batch_index``.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        optimizer: the prepared SAM / SSAM (an ``AcceleratedOptimizer``) or the SAM itself; with
            ``base_step=False``, a SAM built around the prepared *base* optimizer's inner optimizer.
        model: the prepared model. Given, it becomes the optimizer's ``model=``: BatchNorm running
            statistics come from pass 1 only and, under DDP, pass 1 skips the all-reduce
            (``ascent="local"``). Default: the optimizer's own ``model``.
        base_step: ``False`` leaves the base step to the caller's ``optimizer.step()`` on the
            prepared base optimizer (which is what the ``transformers`` ``Trainer`` calls after
            ``training_step``): ``w`` is restored, the descent gradient is in ``.grad``, and under
            fp16 an overflowed ascent pass is marked in it so that the scaler skips that step.
            ``accelerator.clip_grad_norm_`` and ``optimizer_step_was_skipped`` then work as usual;
            SAM's own ``max_grad_norm`` is refused (clip with Accelerate instead).

    Clipping with ``base_step=True``: use ``SAM(max_grad_norm=...)`` (clips the unscaled descent
    gradient right before the base step). ``accelerator.clip_grad_norm_`` would come too late, and
    under fp16 it would unscale the gradients a second time.

    Raises:
        ValueError: the accelerator runs FSDP1, DeepSpeed or Megatron-LM (the message says why), or
            ``base_step=False`` with SAM's own ``max_grad_norm``.
    """

    def __init__(
        self, accelerator: Any, optimizer: Any, *, model: nn.Module | None = None, base_step: bool = True
    ) -> None:
        _check_distributed(accelerator)
        self.accelerator = accelerator
        self.optimizer = unwrap_optimizer(optimizer)
        if model is not None:
            self.optimizer.model = model
        self.base_step = bool(base_step)
        if not self.base_step and self.optimizer.max_grad_norm is not None:
            raise ValueError(
                f"SAMStep(base_step=False) leaves clipping to the caller; the optimizer has max_grad_norm="
                f"{self.optimizer.max_grad_norm!r}: use accelerator.clip_grad_norm_ (or the Trainer's "
                "max_grad_norm) instead"
            )
        sam = self.optimizer
        if sam.param_groups is not sam.base_optimizer.param_groups:
            # accelerator.prepare(base) reloads the base optimizer's state dict, which replaces its
            # param_groups; a SAM built around it before that still holds the old ones. Relink.
            sam.load_state_dict(sam.state_dict())
        self._pending: list[tuple[Callable[..., Tensor], tuple[Any, ...], dict[str, Any], int | None]] = []
        self._held: list[Tensor] = []

    def __call__(self, compute_loss: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        acc, sam = self.accelerator, self.optimizer
        if not self._pending:
            sam.zero_grad()  # a new window: pass 1 accumulates from zero
            self._held = []
        n = _batch_size((args, kwargs))
        self._pending.append((compute_loss, args, kwargs, n))
        if not acc.sync_gradients:
            # Not the window's last micro-batch: its ascent pass now (the gradient accumulates), or
            # its plain pass if a schedule makes this step one without ascent.
            # (MSAM: its one pass, at the perturbed weights of the step, restored after the micro-batch.)
            with sam.accumulation_pass():
                out = _call(compute_loss, args, kwargs, n, None, sam.batch_fraction)
                if out.dim() == 1:  # per-sample losses at w: ESAM compares them with those at w + e
                    self._held.append(out.detach())
                loss = out.mean() if out.dim() == 1 else out
                acc.backward(loss)
            return loss.detach()

        window, held, self._pending, self._held = self._pending, self._held, [], []
        model = sam.model

        def closure() -> Tensor | None:
            kind = sam.current_pass
            if kind == MEASURE:  # ESAM: forward only at w + e (under no_grad), every micro-batch
                for fn, a, kw, size in window:
                    pass_loss(sam, _call(fn, a, kw, size, None, 1.0))
                return None
            if kind != DESCENT:  # the window's last micro-batch at w
                if sam.wants_sample_losses:
                    for h in held:
                        sam.record_sample_losses(h)
                fn, a, kw, size = window[-1]
                loss = pass_loss(sam, _call(fn, a, kw, size, None, sam.batch_fraction))
                acc.backward(loss)
                return loss
            index = sam.batch_index  # ESAM's data selection: indices over the whole window
            local = _split_index(index, [size or 0 for *_, size in window]) if index is not None else None
            selected = int(index.numel()) if index is not None else 0
            for i, (fn, a, kw, size) in enumerate(window):  # every micro-batch of the window at w + e
                last = i == len(window) - 1
                if local is not None and not local[i].numel() and not last:
                    continue  # none of its samples was selected
                # Under DDP the descent gradient is all-reduced once, in the window's last backward.
                with nullcontext() if last or model is None else acc.no_sync(model):
                    if local is None:
                        loss = pass_loss(sam, _call(fn, a, kw, size, None, 1.0))
                    elif not local[i].numel():  # the last backward must run (DDP's all-reduce): zero loss
                        loss = _call(fn, a, kw, size, None, 1.0)[:0].sum()
                    else:
                        out = _call(fn, a, kw, size, local[i], 1.0)
                        loss = _sum_for_selection(out, selected, len(window))
                    acc.backward(loss)
            return None

        scaler = acc.scaler if acc.scaler is not None and acc.scaler.is_enabled() else None
        loss = sam.step(closure, grad_scaler=scaler, base_step=self.base_step)
        if self.base_step and scaler is not None:
            scaler.update()
        return loss.detach()

    def __repr__(self) -> str:
        return f"SAMStep({self.optimizer!r}, base_step={self.base_step}, pending={len(self._pending)})"
