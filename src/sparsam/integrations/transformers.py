"""SAM and SSAM in the Hugging Face ``transformers`` ``Trainer`` (and with PEFT adapters): `SAMTrainer`.

```python
trainer = SAMTrainer(
    model=model, args=TrainingArguments("out", gradient_accumulation_steps=4, bf16=True, max_grad_norm=1.0),
    train_dataset=train, sam=lambda base: SSAM(base, rho=0.05, sparsity=0.5),
)
trainer.train()                        # every optimizer step is one SAM / SSAM step
trainer.train(resume_from_checkpoint=True)   # masks, step count and mask-source state resume too
```

What the Trainer does on its own, and what the subclass changes (each point is tested
against a hand-written two-pass loop):

* **The step.** The Trainer calls ``training_step`` once per micro-batch (forward + backward),
  then clips with ``max_grad_norm``, calls ``optimizer.step()`` on the optimizer it built from
  ``args.optim`` (wrapped by Accelerate), steps the LR scheduler and zeroes the gradients. It
  never calls a closure, so SAM cannot run inside ``optimizer.step()``. `SAMTrainer` keeps
  the Trainer's base optimizer (so its LR scheduler, clipping, GradScaler and ``optim=`` choice
  work as usual) and wraps it in a SAM / SSAM that shares its ``param_groups`` and ``state``.
  ``training_step`` runs pass 1 of each micro-batch as it arrives and, on the micro-batch that
  completes the accumulation window, perturbs, runs pass 2 over every micro-batch of the window
  at ``w + e`` and restores ``w`` ([`SAMStep`][sparsam.integrations.accelerate.SAMStep] with
  ``base_step=False``). The Trainer then clips the descent gradient and takes the base step.
* **Gradient accumulation**: every micro-batch goes through both passes, as SAM on the whole batch
  prescribes; the loss is normalised exactly as the Trainer normalises it (by the number of
  micro-batches, or by ``num_items_in_batch`` for models that take loss kwargs).
* **fp16 / bf16**: the Trainer's autocast context wraps both passes; under fp16 the ascent
  gradient is unscaled by the Trainer's GradScaler before the perturbation, and a step whose pass 1
  overflowed is skipped by that scaler (the Trainer then does not step the LR scheduler).
* **Checkpoints**: the Trainer saves the base optimizer's state (momentum, Adam moments) in
  ``optimizer.pt``; `SAMTrainer` adds ``sparsam.pt`` next to it with SAM's own state (for
  SSAM: the masks, the step count and the mask source's state) and loads it on
  ``resume_from_checkpoint``, so a resumed run continues exactly. (Resuming from a checkpoint without
  ``sparsam.pt`` loads the base optimizer's state and warns.)
* **PEFT / LoRA**: the Trainer's optimizer holds only parameters with ``requires_grad`` (the
  adapters, and the modules PEFT keeps trainable), so SAM and SSAM perturb, normalise over and mask
  only those; the frozen base weights are never copied or touched.
* **BatchNorm** running statistics come from pass 1 only (the model is handed to the optimizer
  as ``model=``). Other side effects of ``forward`` happen twice per micro-batch.

* **Cheaper SAMs** (``docs/variants.md``): any variant as ``sam=``. A sub-batch ascent cuts each
  micro-batch's inputs; ESAM's data selection (``gamma < 1``) needs ``sample_loss=`` (one loss per
  sample from the model's outputs), and its passes then use the mean of those losses (tested).

* **FSDP2** (``TrainingArguments(fsdp=True, fsdp_config={"version": 2})``): Accelerate shards the
  model and points the base optimizer (shared with SAM) at the DTensor parameters before the
  first step; both passes' gradients are reduced over the ranks, so the run equals SAM on the
  global batch in one process (tested with 2 CPU processes). Checkpoints are refused under FSDP2:
  SAM's own state (SSAM's masks) is held per shard.

Not supported: DeepSpeed and FSDP1 through the Trainer (refused with an error: the engine owns
the optimizer step; FSDP1's flat-parameter slices make the global norm impossible), SAM's own ``max_grad_norm`` (use the Trainer's
``max_grad_norm``), and Fisher masks fed by the Trainer's dataloader (its batches are dicts): give
the SSAM built in ``sam=`` a few ``(input_ids, labels)`` batches as ``data=`` and a loss on the
logits, ``loss_fn=lambda out, y: F.cross_entropy(out.logits, y)`` (tested); the model is handed over.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer

from ..optim.sam import SAM
from .accelerate import SAMStep

__all__ = ["SPARSAM_STATE_NAME", "SAMTrainer"]

SPARSAM_STATE_NAME = "sparsam.pt"
"""File name of SAM's own state in a Trainer checkpoint folder (next to ``optimizer.pt``)."""


class SAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose every optimizer step is a SAM / SSAM step.

    Takes every argument of ``Trainer`` and, keyword-only:

    Args:
        sam: ``sam(base_optimizer) -> SAM | SSAM``, called once with the base optimizer the Trainer
            builds from ``args.optim`` (AdamW by default, with its weight-decay groups); the result
            must wrap that optimizer (``SAM(base, rho=...)``, ``SSAM(base, rho=..., sparsity=...)``).
            Default: ``SAM(base, rho=rho)``. You may also pass a ready SAM / SSAM as
            ``optimizers=(sam, scheduler)``; the Trainer then steps its base optimizer.
        rho: the radius of the default ``SAM``; ignored when ``sam`` is given.
        sample_loss: ``sample_loss(outputs, inputs) -> Tensor`` with one loss per sample of the
            micro-batch (``inputs`` is the batch dict, ``outputs`` the model's output), e.g.
            ``lambda out, inp: F.cross_entropy(out.logits, inp["labels"], reduction="none")``.
            Needed by an optimizer that selects samples by their losses (ESAM with ``gamma < 1``)
            and used only then: every pass's loss is then the mean of these losses over the
            window (each micro-batch's mean divided by the number of micro-batches), pass 2 the
            mean over the selected samples, instead of the Trainer's own loss.

    The SAM / SSAM in use is `sam_optimizer` (``None`` before training starts).

    Raises:
        TypeError: ``sam`` returns something that is not a SAM, or one built around another
            optimizer than the one it was given.
        ValueError: the SAM has ``max_grad_norm`` (the Trainer clips; use ``args.max_grad_norm``),
            or it selects samples (ESAM with ``gamma < 1``) and ``sample_loss`` is not given.
        RuntimeError: the Trainer runs under DeepSpeed or FSDP1.
        ValueError: under FSDP2 with checkpoints (``save_strategy`` other than ``"no"``).
    """

    def __init__(
        self,
        *args: Any,
        sam: Callable[[Optimizer], SAM] | None = None,
        rho: float = 0.05,
        sample_loss: Callable[[Any, dict[str, Any]], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if sam is not None and not callable(sam):
            raise TypeError(f"sam must be a function base_optimizer -> SAM, got {type(sam).__name__}")
        if sample_loss is not None and not callable(sample_loss):
            raise TypeError(
                f"sample_loss must be a function (outputs, inputs) -> losses, got {type(sample_loss).__name__}"
            )
        self._sample_loss = sample_loss
        self._sam_factory = sam
        self._sam_rho = rho
        self.sam_optimizer: SAM | None = None
        self._sam_step: SAMStep | None = None
        super().__init__(*args, **kwargs)
        if isinstance(self.optimizer, SAM):  # optimizers=(SAM(...), scheduler)
            self._adopt(self.optimizer)

    # ------------------------------------------------------------------ the optimizer
    def _adopt(self, sam: SAM) -> None:
        if sam.max_grad_norm is not None:
            raise ValueError(
                f"the SAM optimizer has max_grad_norm={sam.max_grad_norm!r}; under the Trainer clip with "
                "TrainingArguments(max_grad_norm=...) instead (it clips the descent gradient before the base step)"
            )
        if sam.selects_samples and self._sample_loss is None:
            raise ValueError(
                f"{sam!r} runs pass 2 on the samples whose loss rose "
                "most, so it needs one loss per sample: pass SAMTrainer(sample_loss=lambda outputs, inputs: "
                "F.cross_entropy(outputs.logits, inputs['labels'], reduction='none')) or the equivalent for your model"
            )
        self.sam_optimizer = sam
        self.optimizer = sam.base_optimizer  # the Trainer clips, steps and schedules the base optimizer

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Optimizer:
        """The Trainer's base optimizer, wrapped in the SAM / SSAM from ``sam=`` (kept in
        `sam_optimizer`); returns the base optimizer, which is what the Trainer steps."""
        self._refuse_sharding()
        if self.sam_optimizer is not None:
            return self.sam_optimizer.base_optimizer
        base = super().create_optimizer(*args, **kwargs)
        if isinstance(base, SAM):
            self._adopt(base)
            return base.base_optimizer
        sam = self._sam_factory(base) if self._sam_factory is not None else SAM(base, rho=self._sam_rho)
        if not isinstance(sam, SAM):
            raise TypeError(f"sam(base_optimizer) must return a sparsam SAM or SSAM, got {type(sam).__name__}")
        if sam.base_optimizer is not base:
            raise TypeError(
                "sam(base_optimizer) must wrap the optimizer it is given (SAM(base, rho=...)), got one around a "
                f"{type(sam.base_optimizer).__name__} built elsewhere: the Trainer would step another optimizer"
            )
        self._adopt(sam)
        return base

    def _refuse_sharding(self) -> None:
        if getattr(self, "is_deepspeed_enabled", False):
            raise RuntimeError(
                "SAMTrainer does not support DeepSpeed: its engine takes the optimizer step inside backward "
                "(the weights would move after pass 1, before SAM perturbs them); see docs/frameworks.md"
            )
        if not getattr(self, "is_fsdp_enabled", False):
            return
        version = getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", 1)
        if version != 2:
            raise RuntimeError(
                f"SAMTrainer does not support FSDP with fsdp_version={version}: FSDP1 hands the optimizer each "
                "rank's slice of the flattened parameters as plain tensors, so no rank can form SAM's global "
                "gradient norm; use fsdp_config={'version': 2} (FSDP2)"
            )
        save = getattr(self.args.save_strategy, "value", self.args.save_strategy)
        if save != "no" or self.args.load_best_model_at_end:
            raise ValueError(
                "SAMTrainer under FSDP2 cannot write checkpoints yet: SAM's own state (SSAM's masks) is held per "
                "shard, and sparsam.pt holds one rank's; pass TrainingArguments(save_strategy='no') and save the "
                f"weights yourself (got save_strategy={save!r})"
            )

    # ------------------------------------------------------------------ the step
    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor | Any],
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor:
        """Pass 1 of this micro-batch; on the window's last micro-batch also the perturbation,
        pass 2 of every micro-batch of the window and the restore. Returns pass 1's loss (the
        Trainer's logged loss is the loss at ``w``)."""
        sam = self.sam_optimizer
        if sam is None:
            raise RuntimeError("SAMTrainer.training_step before create_optimizer(): call trainer.train()")
        if self._sam_step is None or self._sam_step.accelerator is not self.accelerator:
            self._refuse_sharding()
            self._sam_step = SAMStep(self.accelerator, sam, model=model, base_step=False)
        elif sam.param_groups is not sam.base_optimizer.param_groups:
            # the Trainer reloaded the base optimizer's state (resume), which replaces its param_groups
            sam.load_state_dict(sam.state_dict())
        model.train()
        train = getattr(self.optimizer, "train", None)  # schedule-free optimizers
        if callable(train):
            train()
        inputs = self._prepare_inputs(inputs)
        return self._sam_step(self._micro_batch_loss, model, inputs, num_items_in_batch)

    def _micro_batch_loss(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None
    ) -> Tensor:
        """The loss the Trainer's own ``training_step`` backpropagates for this micro-batch; with
        data selection, the micro-batch's per-sample losses (``sample_loss``) scaled so that their
        mean over the window is the window's mean (``SAMStep`` selects and reduces them)."""
        if self._sample_loss is not None and self.sam_optimizer is not None and self.sam_optimizer.selects_samples:
            with self.compute_loss_context_manager():
                _, outputs = self.compute_loss(
                    model, dict(inputs), return_outputs=True, num_items_in_batch=num_items_in_batch
                )
                losses = self._sample_loss(outputs, inputs)
            n = next((v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim()), None)
            if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.shape[0] != n:
                raise ValueError(
                    f"sample_loss must return one loss per sample (a 1-D tensor of length {n}), got "
                    + (f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__)
                )
            steps = getattr(self.accelerator, "gradient_accumulation_steps", 1)
            return losses.float() * (steps / self.current_gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            # compute_loss may pop "labels" (label smoothing): give each pass its own dict
            loss = cast(Tensor, self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch))
        if self.args.n_gpu > 1:
            loss = loss.mean()
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (
                bool(getattr(self, "model_accepts_loss_kwargs", False)) and num_items_in_batch is not None
            ) or getattr(self, "compute_loss_func", None) is not None
        if not scaled:
            loss = loss / self.current_gradient_accumulation_steps
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        sam = self.sam_optimizer
        if sam is not None and self.args.should_save:
            torch.save(sam.state_dict()["sparsam"], os.path.join(output_dir, SPARSAM_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        sam = self.sam_optimizer
        if checkpoint is None or sam is None:
            return
        path = os.path.join(checkpoint, SPARSAM_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"{path} is missing (the checkpoint was not written by SAMTrainer): the base optimizer's state was "
                "loaded, SAM's own state was not (an SSAM draws or computes its masks afresh, its step count restarts)",
                stacklevel=2,
            )
            return
        extra = torch.load(path, map_location="cpu", weights_only=True)
        # Also relinks SAM to the base optimizer's param_groups, which the load above replaced.
        sam.load_state_dict({**sam.base_optimizer.state_dict(), "sparsam": extra})
