"""SAM and SSAM under the PyTorch Lightning ``Trainer``: add
[`SAMCallback`][sparsam.integrations.lightning.SAMCallback].

```python
class Net(L.LightningModule):
    def configure_optimizers(self):
        return SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)

trainer = L.Trainer(precision="16-mixed", gradient_clip_val=1.0, callbacks=[SAMCallback()])
```

Why a callback is needed, and what it does (each point tested against a plain two-step loop,
weight for weight):

* **Stepping.** Under automatic optimization the Trainer hands the optimizer a closure
  (``training_step`` + ``zero_grad`` + ``backward``) through its precision plugin. The plain plugin
  calls ``optimizer.step(closure)``, which SAM can drive (it calls the closure twice), but runs
  Lightning's ``on_before_optimizer_step`` hooks and gradient clipping after *each* call. The
  ``"16-mixed"`` plugin instead calls the closure once and then ``scaler.step(optimizer)``, i.e.
  ``optimizer.step()`` without a closure: a two-pass optimizer cannot survive that. The callback
  replaces the precision plugin's ``optimizer_step`` (for SAM optimizers only) with one call,
  ``sam.step(closure, grad_scaler=..., before_base_step=...)``: the optimizer runs the passes (the
  closure reads ``sam.current_pass``), restores ``w``, and right before the base step runs
  Lightning's hooks and gradient clipping once, on the unscaled descent gradient; then
  ``scaler.update`` under ``"16-mixed"``.
* **What pass 2 may touch.** ``training_step`` runs in both passes. Pass 2's ``self.log`` calls are
  dropped (the logged loss is the clean loss at ``w``, as [`SAM.step`][sparsam.SAM.step] returns), the
  Trainer's reported loss and ``on_train_batch_end`` outputs are pass 1's, BatchNorm running statistics
  are left alone (the module is handed to the optimizer as ``model=``). Other side effects of
  ``training_step`` (a metric object's ``update``) happen twice; guard them with
  [`in_descent_pass`][sparsam.integrations.lightning.in_descent_pass].
* **Cheaper SAMs** (``docs/variants.md``): schedules, LookSAM and ESAM run as SAM does. For a
  sub-batch ascent and ESAM's data selection ``training_step`` takes its pass's samples with
  [`pass_batch`][sparsam.integrations.pass_batch] and returns
  [`pass_loss`][sparsam.integrations.pass_loss] of their per-sample losses; ESAM's forward-only
  ``"measure"`` pass runs ``training_step`` alone (no ``zero_grad``, no ``backward``) under
  ``torch.no_grad()``, with its logs dropped as in pass 2.
* **Gradient accumulation** (``accumulate_grad_batches=k > 1``) is refused under automatic
  optimization. Lightning runs the first k-1 micro-batches outside the optimizer and steps with
  the closure of the last one only, so pass 1 would see all k micro-batches but pass 2 only the
  last (at 1/k of its weight): not SAM. Accumulate in manual optimization instead (docs/frameworks.md).
* **DDP.** With ``ascent="local"`` (SAM's default) pass 1 runs inside the strategy's
  ``block_backward_sync()`` (DDP's ``no_sync``), so each rank perturbs with its own gradient;
  ``ascent="sync"`` all-reduces pass 1 as well. Pass 2 is always all-reduced.
* **Masks that need data** (SSAM with [`FisherMask`][sparsam.masks.FisherMask]): the optimizer gets the
  Trainer's training dataloader (read when the mask is computed) and a loss function
  (``loss_fn=`` here, or the module's ``loss_fn`` attribute), unless it was given its own.
* **Manual optimization.** ``self.optimizers()`` returns Lightning's wrapper, whose class is a
  subclass of SAM's: calling ``first_step`` on it would run SAM's code against the wrapper's own
  attributes (the real optimizer, and so the checkpoint, would never see the masks or the step
  count). The callback points SAM's methods on the wrapper to the real optimizer, makes
  ``second_step`` count as an optimizer step for the Trainer (``global_step``, ``max_steps``) and,
  under ``"16-mixed"``, passes the Trainer's GradScaler to ``first_step`` and calls
  ``scaler.update()`` after ``second_step``. ``opt.step(closure)`` works as in automatic
  optimization.

Supported precision plugins: the plain one (``"32-true"``, ``"64-true"``, ``"16-true"``,
``"bf16-true"``) and ``MixedPrecision`` (``"16-mixed"``, ``"bf16-mixed"``).

Sharded training: FSDP2 through ``ModelParallelStrategy(data_parallel_size=N,
tensor_parallel_size=1)``, with ``fully_shard`` applied in ``configure_model``: the parameters the
optimizer gets are DTensors, which SAM and SSAM step shard by shard with one all-reduce for the
norm (``docs/scaling.md``; tested with 2 CPU processes against one process).
Its checkpoints cannot carry SAM (torch's ``get_optimizer_state_dict`` drops SAM's own state and,
on loading, calls ``optimizer.step(closure=None)``): the callback warns when checkpointing is on and
refuses to resume, with that reason; save with ``torch.distributed.checkpoint`` yourself.
Refused with an error that says why: ``FSDPStrategy`` (FSDP1: the optimizer gets each rank's slice
of the flattened parameters as plain tensors, so no rank can form the norm over all shards),
DeepSpeed (its engine takes the optimizer step after one closure call) and XLA (not tested).
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import (
    DeepSpeedPrecision,
    FSDPPrecision,
    MixedPrecision,
    Precision,
    XLAPrecision,
)
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from ..masks.base import LossFn
from ..optim.sam import ASCENT, DESCENT, MEASURE, SAM
from ..optim.ssam import SSAM

__all__ = ["SAMCallback", "in_descent_pass"]

# Precision plugins whose optimizer_step is one of these are known to be safe to take over.
_KNOWN_STEPS = (Precision.optimizer_step, MixedPrecision.optimizer_step)
_MARK = "_sparsam_original_optimizer_step"
_FSDP1 = (
    "Lightning's FSDPStrategy is FSDP1: it hands the optimizer each rank's slice of the flattened "
    "parameters as plain tensors (1-D, some of them empty), so SAM cannot form the perturbation norm over "
    "all shards (every rank would perturb with the norm of its own slice) and SSAM cannot choose its masks "
    "over the full parameters. Use ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1) and "
    "apply torch.distributed.fsdp.fully_shard in configure_model (FSDP2: DTensor parameters, which SAM and "
    "SSAM step; see docs/frameworks.md and docs/scaling.md)"
)
_NO_RESUME = (
    "the strategy saves and loads the optimizer through torch's get_optimizer_state_dict, which keeps the "
    "base optimizer's state and param_groups but drops SAM's own entry, and which on loading first fills the "
    "empty state of the new optimizer by calling optimizer.step(closure=None), a step SAM cannot take"
)
# Why a precision plugin with its own optimizer_step cannot be taken over (checked in Lightning 2.6).
_OWN_STEP = {
    FSDPPrecision: _FSDP1,
    DeepSpeedPrecision: (
        "DeepSpeed's precision plugin calls the closure once and then deepspeed_engine.step(): the engine "
        "takes the optimizer step itself, with no point between two passes where SAM could perturb the "
        "weights. For sharded training use FSDP2 (ModelParallelStrategy with fully_shard; docs/scaling.md)"
    ),
    XLAPrecision: (
        "the XLA plugin's optimizer step (gradients all-reduced by xm.reduce_gradients inside the closure, "
        "then xm.mark_step) has not been tested with SAM"
    ),
}
_DESCENT: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def in_descent_pass(module: nn.Module) -> bool:
    """True while ``module``'s ``training_step`` runs at ``w + e``: SAM's second pass, or ESAM's
    forward-only ``"measure"`` pass.

    Use it to keep side effects out of pass 2, e.g. ``if not in_descent_pass(self):
    self.train_acc.update(preds, y)``. ``self.log`` needs no guard:
    [`SAMCallback`][sparsam.integrations.lightning.SAMCallback] drops
    pass 2's logs."""
    return module in _DESCENT


class SAMCallback(Callback):
    """Make the Lightning ``Trainer`` drive [`SAM`][sparsam.SAM] / [`SSAM`][sparsam.SSAM] correctly.

    See the module docstring for what it changes and why.

    Args:
        loss_fn: ``loss_fn(outputs, targets) -> mean loss``, handed to an SSAM whose mask source
            needs data (Fisher) if the optimizer has none. Default: the module's ``loss_fn``
            attribute.
        data: an iterable of ``(inputs, targets)`` batches for such a mask source. Default: the
            Trainer's training dataloader. ``module(inputs)`` must give the outputs.
        log_descent: keep ``self.log`` calls made during pass 2 (at ``w + e``). Default: drop them.
    """

    def __init__(
        self, *, loss_fn: LossFn | None = None, data: Iterable[Any] | None = None, log_descent: bool = False
    ) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.data = data
        self.log_descent = bool(log_descent)
        self._patched: list[tuple[Any, list[str]]] = []
        self._patched_classes: list[tuple[type, list[str]]] = []

    # ------------------------------------------------------------------ Lightning hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sams = [opt for opt in trainer.optimizers if isinstance(opt, SAM)]
        if not sams:
            rank_zero_warn("SAMCallback: configure_optimizers returned no sparsam SAM/SSAM optimizer; nothing to do")
            return
        _check_accumulation(trainer, pl_module)
        if isinstance(trainer.strategy, FSDPStrategy):
            raise ValueError(f"SAMCallback cannot drive SAM under {type(trainer.strategy).__name__}. {_FSDP1}")
        if isinstance(trainer.strategy, ModelParallelStrategy):
            self._guard_checkpoints(trainer)
        self._take_over_step(trainer.strategy.precision_plugin)
        for sam in sams:
            if sam.model is None:
                sam.model = pl_module  # BatchNorm statistics from pass 1 only; SSAM parameter names
            if isinstance(sam, SSAM) and sam.mask_source.needs_data:
                self._hand_data(sam, trainer, pl_module)
        self._redirect_wrapper_methods(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _check_accumulation(trainer, pl_module)  # a GradientAccumulationScheduler may change it

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for obj, names in self._patched:
            for name in names:
                obj.__dict__.pop(name, None)
        self._patched = []
        for cls, names in self._patched_classes:
            for name in names:
                if name in vars(cls):
                    delattr(cls, name)
        self._patched_classes = []

    # ------------------------------------------------------------------ wiring
    def _take_over_step(self, plugin: Precision) -> None:
        if _MARK in plugin.__dict__:
            return
        if getattr(type(plugin), "optimizer_step", None) not in _KNOWN_STEPS:
            why = next((r for cls, r in _OWN_STEP.items() if isinstance(plugin, cls)), "it has its own optimizer step")
            raise ValueError(
                f"SAMCallback cannot drive SAM through the precision plugin {type(plugin).__name__}: {why}. "
                "Supported: precision='32-true', '64-true', '16-true', 'bf16-true', '16-mixed', 'bf16-mixed'"
            )
        if not callable(getattr(plugin, "_after_closure", None)):
            raise RuntimeError(
                f"this Lightning version's {type(plugin).__name__} has no _after_closure (hooks + gradient "
                "clipping before the optimizer step); SAMCallback was written against Lightning 2.x"
            )
        original = plugin.optimizer_step
        log_descent = self.log_descent

        def optimizer_step(optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any) -> Any:
            if isinstance(optimizer, SAM) and isinstance(model, pl.LightningModule):
                return _sam_step(plugin, optimizer, model, closure, log_descent=log_descent, **kwargs)
            return original(optimizer, model=model, closure=closure, **kwargs)

        plugin.__dict__["optimizer_step"] = optimizer_step
        plugin.__dict__[_MARK] = original
        self._patched.append((plugin, ["optimizer_step", _MARK]))

    def _guard_checkpoints(self, trainer: pl.Trainer) -> None:
        """ModelParallelStrategy's checkpoints cannot carry SAM: warn when they are written, refuse to
        resume from one (with the reason, instead of SAM's error from inside torch)."""
        strategy = trainer.strategy
        name = type(strategy).__name__
        if trainer.checkpoint_callbacks:
            rank_zero_warn(
                f"SAMCallback: checkpoints written under {name} hold the base optimizer's state but not SAM's "
                f"own (SSAM's masks and step count), and a run cannot resume from them: {_NO_RESUME}. Pass "
                "enable_checkpointing=False and save with torch.distributed.checkpoint yourself (docs/scaling.md)"
            )
        if "load_checkpoint" in strategy.__dict__:
            return

        def load_checkpoint(*args: Any, **kwargs: Any) -> Any:
            raise ValueError(
                f"SAMCallback cannot resume SAM from a checkpoint under {name}: {_NO_RESUME}. Save and load with "
                "torch.distributed.checkpoint yourself (docs/scaling.md, docs/frameworks.md)"
            )

        strategy.__dict__["load_checkpoint"] = load_checkpoint
        self._patched.append((strategy, ["load_checkpoint"]))

    def _hand_data(self, sam: SSAM, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if sam.data is None:
            sam.data = self.data if self.data is not None else _TrainBatches(trainer)
        if sam.loss_fn is None:
            loss_fn = self.loss_fn if self.loss_fn is not None else getattr(pl_module, "loss_fn", None)
            if not callable(loss_fn):
                raise ValueError(
                    f"the SSAM mask source {type(sam.mask_source).__name__} needs a loss function: pass "
                    "SAMCallback(loss_fn=...), give the LightningModule a loss_fn attribute, or pass "
                    "loss_fn= to SSAM in configure_optimizers"
                )
            sam.loss_fn = loss_fn

    def _redirect_wrapper_methods(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        plugin = trainer.strategy.precision_plugin
        lopts = pl_module.optimizers()  # Lightning's wrappers: one, or a list
        for lopt in lopts if isinstance(lopts, list) else [lopts]:
            sam = getattr(lopt, "_optimizer", None)
            if not isinstance(sam, SAM) or "first_step" in lopt.__dict__:
                continue
            names = _sam_method_names(type(sam))
            for name in names:
                lopt.__dict__[name] = getattr(sam, name)
            lopt.__dict__["first_step"], lopt.__dict__["second_step"] = _counted_steps(lopt, sam, plugin)
            self._patched.append((lopt, names))
            # The wrapper's properties (current_pass, batch_index, ...) would read its own stale copy
            # of the optimizer's attributes; its class is made for it alone, so forward them there.
            cls = type(lopt)
            if cls.__name__ == "Lightning" + type(sam).__name__ and issubclass(cls, type(sam)):
                props = _sam_property_names(type(sam))
                for name in props:
                    setattr(cls, name, _forwarded(sam, name))
                self._patched_classes.append((cls, props))


# ---------------------------------------------------------------------------------- the step
class _SkipStep(Exception):
    """training_step returned None in pass 1: Lightning skips such a step, and so do we."""


def _sam_step(
    plugin: Precision,
    sam: SAM,
    model: pl.LightningModule,
    closure: Callable[[], Any],
    *,
    log_descent: bool,
    **kwargs: Any,
) -> Any:
    """One SAM step driven from Lightning's precision plugin (automatic, or ``opt.step(closure)``):
    one call to ``sam.step``, with a closure that adapts Lightning's closure to each pass."""
    if kwargs:
        raise TypeError(f"{type(sam).__name__}.step() under Lightning takes no extra arguments, got {sorted(kwargs)}")
    trainer = model.trainer
    _check_accumulation(trainer, model)
    scaler = _enabled_scaler(plugin)

    def pass_closure() -> Any:
        if sam.current_pass == MEASURE:  # ESAM: forward only at w + e (under no_grad), no backward
            step_fn = getattr(closure, "_step_fn", None)  # automatic optimization: training_step alone
            if step_fn is None and model.automatic_optimization:
                raise RuntimeError(
                    f"{type(sam).__name__}'s forward-only pass needs training_step without backward, but this "
                    "Lightning version's automatic-optimization closure has no _step_fn (SAMCallback was written "
                    "against Lightning 2.x): use manual optimization, or gamma=1 (no data selection)"
                )
            with _descent(model, quiet=not log_descent):
                if step_fn is None:  # manual optimization: the user's closure follows the contract itself
                    return closure()
                step_fn()  # training_step records its per-sample losses through pass_loss
            return None
        if sam.current_pass == DESCENT:  # at w + e: pass 1's logs and result are the ones kept
            with _descent(model, quiet=not log_descent), _keep_closure_result(closure):
                return closure()
        with _ascent_sync(sam, trainer.strategy):
            result = closure()  # training_step, zero_grad, backward (scaled under "16-mixed")
        if result is None and model.automatic_optimization:
            raise _SkipStep
        return result

    def before_base_step() -> None:
        # What Lightning does before any optimizer step (the gradient is unscaled by now):
        # on_before_optimizer_step hooks and Trainer(gradient_clip_val=...).
        plugin._after_closure(model, sam)

    try:
        result = sam.step(pass_closure, grad_scaler=scaler, before_base_step=before_base_step)
    except _SkipStep:
        return None
    if scaler is not None:
        scaler.update()
    return result


def _counted_steps(lopt: Any, sam: SAM, plugin: Precision) -> tuple[Callable[..., None], Callable[..., None]]:
    """``first_step`` / ``second_step`` for Lightning's optimizer wrapper (manual optimization)."""
    used: list[Any] = []

    def first_step(zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        if grad_scaler is None:
            grad_scaler = _enabled_scaler(plugin)  # manual_backward scaled the loss with it
        used[:] = [grad_scaler] if grad_scaler is not None else []
        sam.first_step(zero_grad, grad_scaler=grad_scaler)

    def second_step(zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        lopt._on_before_step()  # the manual loop's step counter: global_step, max_steps
        sam.second_step(zero_grad, grad_scaler=grad_scaler)
        if used and used[0] is _enabled_scaler(plugin):
            used[0].update()
        used.clear()
        lopt._on_after_step()

    return first_step, second_step


def _sam_method_names(cls: type) -> list[str]:
    names = []
    for klass in cls.__mro__:
        if klass is Optimizer or not issubclass(klass, SAM):
            continue
        for name, value in vars(klass).items():
            if inspect.isfunction(value) and not name.startswith("__") and name != "step" and name not in names:
                names.append(name)
    return names


def _forwarded(sam: SAM, name: str) -> property:
    def get(_wrapper: Any) -> Any:
        return getattr(sam, name)

    return property(get)


def _sam_property_names(cls: type) -> list[str]:
    names: list[str] = []
    for klass in cls.__mro__:
        if klass is Optimizer or not issubclass(klass, SAM):
            continue
        names += [n for n, v in vars(klass).items() if isinstance(v, property) and n not in names]
    return names


def _enabled_scaler(plugin: Precision) -> Any:
    scaler = getattr(plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def _check_accumulation(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    k = trainer.accumulate_grad_batches
    if module.automatic_optimization and k > 1:
        raise ValueError(
            f"SAM under automatic optimization cannot use accumulate_grad_batches={k}: Lightning steps "
            "with the closure of the last micro-batch only, so the second (perturbed) pass would see 1 of "
            f"{k} micro-batches. Use manual optimization and run every micro-batch in both passes "
            "(see docs/frameworks.md), or a larger batch"
        )


def _ascent_sync(sam: SAM, strategy: Any) -> Any:
    # ascent="local": each data-parallel rank perturbs with its own gradient, so pass 1 skips the
    # gradient all-reduce (DDP's no_sync, which Lightning exposes as block_backward_sync).
    if sam.current_pass == ASCENT and sam.ascent == "local" and hasattr(strategy, "block_backward_sync"):
        return strategy.block_backward_sync()
    return nullcontext()


def _discard_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _descent(module: pl.LightningModule, *, quiet: bool) -> Iterator[None]:
    _DESCENT.add(module)
    patched = []
    if quiet:
        for name in ("log", "log_dict"):
            if name not in module.__dict__:
                module.__dict__[name] = _discard_log
                patched.append(name)
    try:
        yield
    finally:
        for name in patched:
            module.__dict__.pop(name, None)
        _DESCENT.discard(module)


@contextmanager
def _keep_closure_result(closure: Any) -> Iterator[None]:
    # Lightning's automatic-optimization closure remembers its last result (the reported loss and
    # the outputs handed to on_train_batch_end): keep pass 1's, the loss at w.
    saved = closure.__dict__.get("_result") if hasattr(closure, "__dict__") else None
    try:
        yield
    finally:
        if saved is not None:
            closure._result = saved


class _TrainBatches:
    """The Trainer's training batches, looked up when a mask source iterates (the dataloader does
    not exist yet when the callback wires the optimizer)."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self._trainer = weakref.ref(trainer)

    def __iter__(self) -> Iterator[Any]:
        trainer = self._trainer()
        loader = trainer.train_dataloader if trainer is not None else None
        if loader is None:
            raise RuntimeError("the Trainer has no training dataloader yet; pass data= to SSAM or to SAMCallback")
        if isinstance(loader, (dict, list, tuple)):
            raise TypeError(
                "the Trainer has several training dataloaders; pass data= (an iterable of (inputs, targets)) "
                "to SSAM or to SAMCallback"
            )
        return iter(loader)
