"""Sparse SAM (SSAM): SAM whose perturbation is restricted by a binary mask."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from ..masks.base import LossFn, MaskContext, MaskSource, check_sparsity
from ..masks.manual import ManualMask
from ..masks.random import RandomMask
from .implicit import check_implicit_layers, is_2to4_rows, masked_input_gradients
from .. import _sharded
from .sam import SAM

NORMS = ("full", "masked")
"""The values of ``norm=``: the full gradient's norm (the authors') or the masked gradient's."""
_SPARSE_ASCENT_FSDP2 = (
    "sparse_ascent=True is not supported on parameters sharded by FSDP2: a shard whose mask is all False on one "
    "rank only would leave that rank out of FSDP's gradient reduce-scatter while the others wait in it; pass "
    "sparse_ascent=False (the default under FSDP2)"
)
FORMS = ("explicit", "implicit")
"""The values of ``form=``: mask the perturbation, or perturb densely and mask the ascent's input gradients."""
# How SSAM treats a parameter, decided when a mask is set (a host sync there, never in a step).
_SKIP, _PARTIAL, _DENSE = 0, 1, 2


class SSAM(SAM):
    r"""Sparse SAM (Mi et al., NeurIPS 2022; TPAMI 2025): only masked coordinates are perturbed.

    With a bool mask ``m`` per parameter (``m = 1``: perturbed):

    ```text
    norm="full"   (default, the authors' code):  e = rho · m ⊙ T² g / (‖T g‖₂ + eps)    ‖e‖ <= rho
    norm="masked" (renormalised, as SAM-ON):     e = rho · m ⊙ T² g / (‖m ⊙ T g‖₂ + eps) ‖e‖ = rho
    ```

    ``T = 1`` unless ``adaptive=True`` (ASAM). The descent gradient and the base step stay dense.
    ``sparsity`` is the fraction of coordinates NOT perturbed (the papers' meaning). A parameter
    without a mask, or whose mask is entirely False, is neither copied nor touched in the step
    (with ``norm="full"`` its gradient still counts in the norm). An all-True mask gives exactly
    SAM and an all-False mask exactly the base optimizer.

    Masks come from a mask source (``sparsam.masks``: random, Fisher, dynamic, ...) or are set
    by hand with [`set_masks`][sparsam.SSAM.set_masks]; built without ``sparsity`` and ``mask``, SSAM's
    source is a [`ManualMask`][sparsam.masks.ManualMask] and the masks must be set by hand before the
    first step. They are stored as bool tensors (1 byte per coordinate), saved in
    [`state_dict`][sparsam.SAM.state_dict] together with the mask source's state, and, under
    ``torch.distributed``, broadcast from rank 0 after every init/update so all ranks perturb the same
    coordinates. On parameters sharded by FSDP2 each rank holds the masks of its own shards, which
    the Fisher, dynamic and random sources choose with a distributed threshold: together they are
    the masks one process would choose (``docs/scaling.md``).

    Two forms (TPAMI 2025):

    - ``form="explicit"`` (default): the perturbation is masked, as above.
    - ``form="implicit"``: the perturbation is dense SAM, but in the ascent backward every
      Linear/Conv layer whose weight has a mask sends its input gradient through ``W ⊙ M``
      (``dX = dY (W ⊙ M)^T``-style; forward and ``dW`` dense). See ``sparsam.optim.implicit``.
      Needs ``model=``; only active inside [`ascent_pass`][sparsam.SSAM.ascent_pass] (which
      [`step`][sparsam.SAM.step] uses). A mask source that does not read the ascent gradient
      (Fisher, random) initialises and updates its masks on entering ``ascent_pass``, before pass 1,
      so a new mask already shapes the backward of the step it is made for (the authors' implicit
      path, TPAMI release ``utils/engine.py``).

    Cheaper ascent (``sparse_ascent``): with ``norm="masked"`` the ascent pass only needs the
    gradients of perturbed coordinates, so inside [`ascent_pass`][sparsam.SSAM.ascent_pass] every
    parameter whose mask is entirely False has ``requires_grad`` switched off: autograd skips its
    weight-gradient kernels, and below the lowest perturbed layer the backward stops. The perturbation
    is exactly the one a dense pass gives. With ``norm="full"`` the norm needs every gradient, so the
    dense pass is
    required: ``sparse_ascent=True`` then raises. Default ``None``: on exactly when
    ``norm="masked"`` and ``form="explicit"`` and no parameter is sharded by FSDP2. Steps on which a
    gradient-based mask source updates (``needs_grads``) always run a dense ascent pass. Under DDP it
    needs ``ascent="local"``. Under FSDP2 it is not supported (a shard whose mask is all False on
    one rank only would leave that rank out of FSDP's gradient reduce-scatter): it is off by default
    there, and ``sparse_ascent=True`` raises when SSAM is built, on every rank alike.

    Args:
        params_or_optimizer, base_optimizer_cls, **kwargs: as [`SAM`][sparsam.SAM].
        sparsity: shortcut for ``mask=RandomMask(sparsity)``; if ``mask`` is also given, it must
            agree with ``mask.sparsity``. Neither given: ``mask=ManualMask()`` (masks set by hand).
        mask: the mask source. Its ``init`` runs at the first [`first_step`][sparsam.SAM.first_step] (or
            at [`init_masks`][sparsam.SSAM.init_masks]), unless masks were loaded or set by hand; its
            ``update`` runs at the start of a step when the source asks for it. The step count the
            source sees counts
            the steps taken: a step a GradScaler skips (non-finite gradients) does not count, as
            a skipped ``optimizer.step()`` does not count for an LR scheduler.
        norm: ``"full"`` or ``"masked"``, see above.
        model, loss_fn, data: handed to the mask source (Fisher masks need all three; names of
            parameters come from ``model.named_parameters()``). ``data`` is an iterable of
            ``(inputs, targets)`` batches; ``loss_fn(outputs, targets)`` returns a batch's mean loss.
        sync_masks: broadcast masks from rank 0 when ``torch.distributed`` is initialised.
        form: ``"explicit"`` or ``"implicit"``, see above.
        implicit_layers: the layers the implicit form masks: ``"conv+linear"`` (default),
            ``"conv"`` (the authors' ``--samconv``) or ``"linear"`` (their ``--culinear``). A
            masked layer whose mask is all False sends ``dX = 0``.
        sparse_ascent: the cheaper ascent pass, see above.
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[Optimizer] | None = None,
        *,
        rho: float = 0.05,
        sparsity: float | None = None,
        mask: MaskSource | None = None,
        norm: str = "full",
        model: nn.Module | None = None,
        loss_fn: LossFn | None = None,
        data: Iterable[Any] | None = None,
        sync_masks: bool = True,
        form: str = "explicit",
        sparse_ascent: bool | None = None,
        implicit_layers: str = "conv+linear",
        **kwargs: Any,
    ) -> None:
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {form!r}")
        if form == "implicit" and model is None:
            raise ValueError("form='implicit' needs model= (the layers whose backward is masked)")
        explicit_sparse_ascent = sparse_ascent
        if sparse_ascent is None:
            sparse_ascent = norm == "masked" and form == "explicit"
        elif sparse_ascent and norm != "masked":
            raise ValueError(
                f"sparse_ascent=True needs norm='masked', got norm={norm!r}: the full-gradient norm "
                "needs every gradient, so the ascent pass must stay dense"
            )
        elif sparse_ascent and form != "explicit":
            raise ValueError("sparse_ascent=True needs form='explicit': the implicit form perturbs densely")
        if sparsity is not None:
            sparsity = check_sparsity(sparsity)
        if mask is None:
            # Neither: the masks are set by hand (set_masks) before the first step.
            mask = ManualMask() if sparsity is None else RandomMask(sparsity)
        elif not isinstance(mask, MaskSource):
            raise TypeError(f"mask must be a sparsam.masks.MaskSource, got {type(mask).__name__}")
        elif sparsity is not None and abs(sparsity - mask.sparsity) > 1e-12:
            raise ValueError(f"sparsity={sparsity!r} disagrees with the mask source's sparsity={mask.sparsity!r}")
        super().__init__(params_or_optimizer, base_optimizer_cls, rho=rho, model=model, **kwargs)
        self.norm = norm
        self.form = form
        self.implicit_layers = check_implicit_layers(implicit_layers)
        self._implicit_masks: dict[Tensor, Tensor] = {}  # every mask, all-False ones included
        self.sparse_ascent = bool(sparse_ascent)
        if self.sparse_ascent and any(map(_sharded.is_sharded, self._all_params())):
            # Decided here, the same on every rank: a per-step decision from this rank's masks could
            # leave one rank out of FSDP's reduce-scatter while the others wait in it.
            if explicit_sparse_ascent:
                raise ValueError(_SPARSE_ASCENT_FSDP2)
            self.sparse_ascent = False
        self.mask_source = mask
        self.loss_fn = loss_fn
        self.data = data
        self.sync_masks = sync_masks
        self._masks: dict[Tensor, Tensor] = {}
        self._kind: dict[Tensor, int] = {}
        self._sparse_ok: dict[Tensor, bool] = {}
        self._masks_ready = False
        self._steps = 0  # SSAM steps taken (not skipped by a GradScaler): the clock of the mask schedule
        self._early_update_at: int | None = None  # step count of the last update made before pass 1
        self._base_stepped = False
        self._base_step_run = False  # second_step ran the base step (through a GradScaler, which may skip it)
        self._step_deferred = False  # second_step(base_step=False) ran; the caller's base step is due
        # transient: what a mask update of the current step replaced, put back if the step does not count
        self._mask_undo: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        self._frozen_at_masking: set[Tensor] = set()  # frozen when the masks were chosen: no mask
        self.base_optimizer.register_step_post_hook(self._on_base_step)
        if isinstance(mask, ManualMask) and mask.given is not None:
            # Names and shapes are known now: refuse a bad mask before any step. Under FSDP2 a mask of
            # the full shape is cut to this rank's shard at the first step, as here.
            by_name = {n: p for p, n in self.param_names().items()}
            self._validated_masks(
                {
                    n: _sharded.local_part(m, by_name[n])
                    if n in by_name and _sharded.is_sharded(by_name[n]) and m.shape == by_name[n].shape
                    else m
                    for n, m in mask.given.items()
                }
            )

    def _on_base_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._base_stepped = True
        if self._step_deferred:  # the base step a second_step(base_step=False) left to the caller
            self._step_deferred = False
            self._steps += 1
            self._mask_undo = None

    @property
    def sparsity(self) -> float:
        return self.mask_source.sparsity

    # ------------------------------------------------------------------ names and masks
    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _perturbable(self) -> list[Tensor]:
        return [p for g in self.param_groups if g["rho"] > 0 for p in g["params"] if p.requires_grad]

    def param_names(self) -> dict[Tensor, str]:
        """A name for every parameter: the group's ``param_names`` if the optimizer was built from
        named parameters, else the model's names, else ``"param.<index>"``."""
        names: dict[Tensor, str] = {}
        if self.model is not None:
            for n, p in self.model.named_parameters():
                names.setdefault(p, _strip_wrapper_prefix(n))
        i = 0
        for g in self.param_groups:
            given = g.get("param_names")
            for j, p in enumerate(g["params"]):
                if given is not None:
                    names[p] = given[j]
                elif p not in names:
                    names[p] = f"param.{i}"
                i += 1
        return names

    @property
    def masks(self) -> dict[str, Tensor]:
        """The current masks by parameter name (bool tensors; unmasked parameters are absent)."""
        names = self.param_names()
        return {names[p]: m for p, m in self._masks.items()}

    def set_masks(self, masks: Mapping[Any, Tensor]) -> None:
        """Set the masks by hand: a mapping from parameter (tensor) or parameter name to a bool
        tensor of the parameter's shape. A parameter left out is not perturbed. Validated fully
        before anything changes."""
        self._install(self._validated_masks(masks))
        self._frozen_at_masking = set()  # masks given by hand: what is left out is meant to be

    def _validated_masks(self, masks: Mapping[Any, Tensor]) -> dict[Tensor, Tensor]:
        """``masks`` by parameter, each checked (a known parameter or name, a bool tensor of the
        parameter's shape); raises naming the first bad entry, changes nothing."""
        names = self.param_names()
        by_name = {n: p for p, n in names.items()}
        known = set(self._all_params())
        new: dict[Tensor, Tensor] = {}
        for key, m in masks.items():
            if isinstance(key, str):
                if key not in by_name:
                    raise KeyError(f"no parameter named {key!r} in this optimizer (known: {sorted(by_name)[:8]}...)")
                p = by_name[key]
            elif isinstance(key, Tensor):
                if key not in known:
                    raise KeyError(
                        f"mask given for a tensor of shape {tuple(key.shape)} that is not a parameter of this optimizer"
                    )
                p = key
            else:
                raise TypeError(f"mask keys must be parameters or parameter names, got {type(key).__name__}")
            name = names[p]
            if not isinstance(m, Tensor):
                raise TypeError(f"mask for parameter {name!r} must be a tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                raise TypeError(
                    f"mask for parameter {name!r} of shape {tuple(p.shape)} must have dtype torch.bool, got {m.dtype}"
                )
            if m.shape != _sharded.local(p).shape:  # FSDP2: a mask covers this rank's shard
                raise ValueError(f"mask for parameter {name!r}: {_sharded.mask_shape_error(m, p)}")
            new[p] = m.detach().to(p.device, non_blocking=False)
        return new

    def _install(self, new: dict[Tensor, Tensor]) -> None:
        if self._in_perturbation:  # the restore needs the perturbed parameters' kept w
            raise RuntimeError(
                "the masks cannot change between first_step() and second_step(): the weights are at w + e; "
                "call second_step() or restore() first"
            )
        kinds: dict[Tensor, int] = {}
        for p, m in new.items():
            # Classifying a mask reads two booleans back to the host; this happens only when masks
            # change (init / update / load), never inside an ordinary step.
            if m.numel() == 0 or not bool(m.any()):
                kinds[p] = _SKIP
            elif bool(m.all()):
                kinds[p] = _DENSE
            else:
                kinds[p] = _PARTIAL
        self._masks = {p: m for p, m in new.items() if kinds[p] != _SKIP}
        self._kind = kinds
        if isinstance(self.mask_source, ManualMask):  # its sparsity is that of the masks set
            perturbable = self._perturbable()
            total = sum(p.numel() for p in perturbable)
            kept = sum(int(self._masks[p].sum()) for p in perturbable if p in self._masks)
            self.mask_source.sparsity = 1.0 - kept / total if total else float("nan")
        if self.form == "implicit":
            self._sparse_ok = {p: is_2to4_rows(m.t()) for p, m in self._masks.items() if m.dim() == 2}
            self._implicit_masks = dict(new)
        for p in list(self._backup):  # free copies of tensors no longer perturbed
            if kinds.get(p, _SKIP) == _SKIP:
                del self._backup[p]
        self._masks_ready = True

    def _mask_of(self, p: Tensor) -> tuple[bool, Tensor | None]:
        if self.form == "implicit":  # dense perturbation; the masks act in the ascent backward
            return True, None
        kind = self._kind.get(p, _SKIP)
        if kind == _SKIP:
            return False, None
        return True, (None if kind == _DENSE else self._masks[p])

    def _use_masked_norm(self) -> bool:
        return self.norm == "masked"

    # ------------------------------------------------------------------ the ascent pass
    def _dense_ascent_needed(self) -> bool:
        src = self.mask_source
        if not self._masks_ready:
            return src.needs_grads
        return src.needs_grads and src.wants_update(self._steps)

    @contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Pass-1 context: DDP ``no_sync`` (``ascent="local"``), plus the cheaper ascent
        (``sparse_ascent``) or the implicit form's masked input gradients."""
        self._settle_deferred_step()
        if not self._masks_ready and not self.mask_source.needs_grads:
            self.init_masks()  # the mask is needed now to know what pass 1 can skip
        elif self.form == "implicit" and not self.mask_source.needs_grads:
            # The implicit form's masks act in pass 1's backward: a source that does not read the
            # ascent gradient updates before pass 1, so a new mask serves the step it is made for.
            self._update_masks(early=True)
        with super().ascent_pass():
            if self.form == "implicit":
                with masked_input_gradients(
                    cast(nn.Module, self.model),  # form="implicit" requires model= (checked in __init__)
                    self._implicit_masks,
                    self._sparse_ok,
                    layers=self.implicit_layers,
                ):
                    yield
                return
            frozen: list[Tensor] = []
            if self.sparse_ascent and self._masks_ready and not self._dense_ascent_needed():
                # Pass-1 gradients serve only the perturbation: skip every parameter it won't move.
                frozen = [
                    p
                    for g in self.param_groups
                    for p in g["params"]
                    if p.requires_grad and (g["rho"] == 0 or self._kind.get(p, _SKIP) == _SKIP)
                ]
                if len(frozen) == sum(p.requires_grad for p in self._all_params()):
                    frozen = []  # nothing is perturbed: keep pass 1 as it is so backward() still works
                if any(map(_sharded.is_sharded, self._all_params())):  # the same answer on every rank
                    raise RuntimeError(_SPARSE_ASCENT_FSDP2)  # sharded groups added after construction
                if frozen and self.ascent == "sync" and hasattr(self.model, "no_sync"):
                    raise RuntimeError(
                        "sparse_ascent under DDP needs ascent='local' (pass 1 outside the gradient "
                        "all-reduce); got ascent='sync'"
                    )
            try:
                for p in frozen:
                    p.requires_grad_(False)
                yield
            finally:
                for p in frozen:
                    p.requires_grad_(True)

    def mask_context(self) -> MaskContext:
        """The [`MaskContext`][sparsam.masks.MaskContext] handed to the mask source now."""
        names = self.param_names()
        params = {names[p]: p for p in self._perturbable()}
        grads = {n: p.grad for n, p in params.items() if p.grad is not None}
        model = self.model
        while model is not None and hasattr(model, "no_sync") and hasattr(model, "module"):
            model = cast(nn.Module, model.module)  # mask sources see the plain model, not the DDP wrapper
        return MaskContext(
            params=params,
            model=model,
            loss_fn=self.loss_fn,
            data=self.data,
            step=self._steps,
            grads=grads,
            masks=self.masks,
        )

    def _apply_source(self, result: Mapping[str, Tensor] | None) -> None:
        if result is None:
            return
        # Sharded masks (DTensors, FSDP2: chosen per shard by the distributed threshold) are this
        # rank's own part already; full masks are rank 0's on every rank, cut to this rank's rows.
        sharded = {n: _sharded.local(m) for n, m in result.items() if _sharded.is_sharded(m)}
        masks = {n: m for n, m in result.items() if n not in sharded}
        if masks and self.sync_masks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            masks = _broadcast_masks(masks)
        if masks and any(_sharded.is_sharded(p) for p in self._all_params()):  # FSDP2: keep this rank's part
            by_name = {n: p for p, n in self.param_names().items()}
            masks = {n: _sharded.local_part(m, by_name[n]) if n in by_name else m for n, m in masks.items()}
        self.set_masks({n: sharded[n] if n in sharded else masks[n] for n in result})
        self._note_frozen(set(self._kind))

    def _note_frozen(self, decided: set[Tensor]) -> None:
        """Remember the parameters of perturbed groups that got no mask because they were frozen
        (``requires_grad=False``) when the masks were chosen (``decided``: those that got one)."""
        perturbed_groups = [g["params"] for g in self.param_groups if g["rho"] > 0]
        self._frozen_at_masking = {p for ps in perturbed_groups for p in ps if not p.requires_grad and p not in decided}

    def _masks_renewed(self) -> bool:
        """Whether the masks are chosen again during training (the source has an update period)."""
        return self.mask_source.update_every is not None

    def _warn_unfrozen(self) -> None:
        """Warn once per parameter that was frozen when the masks were chosen and is trainable now:
        it has no mask, so it is not perturbed until the masks are chosen again."""
        thawed = [p for p in self._frozen_at_masking if p.requires_grad]
        if not thawed:
            return
        self._frozen_at_masking.difference_update(thawed)
        names = self.param_names()
        listed = ", ".join(sorted(repr(names[p]) for p in thawed))
        src = type(self.mask_source).__name__
        if self._masks_renewed():
            when = f"{src} includes it from its next mask update on"
        else:
            when = f"{src} never updates its masks, so it stays unperturbed"
        warnings.warn(
            f"SSAM: parameter(s) {listed} were frozen (requires_grad=False) when the masks were chosen and are "
            f"trainable now, without a mask: {when}. Call opt.init_masks() to choose the masks again over the "
            "parameters trainable now, or opt.set_masks(...) to give them masks",
            UserWarning,
            stacklevel=4,
        )

    def init_masks(self) -> None:
        """Ask the mask source for the first masks now (otherwise done at the first step)."""
        self._apply_source(self.mask_source.init(self.mask_context()))
        self._masks_ready = True

    def _before_perturb(self) -> None:
        self._settle_deferred_step()
        self._base_stepped = self._base_step_run = self._step_deferred = False
        if not self._masks_ready:
            self.init_masks()
        else:
            self._update_masks(early=False)
        self._warn_unfrozen()

    def _update_masks(self, *, early: bool) -> None:
        """Ask the source for new masks if it wants them at this step: at the start of pass 1
        (``early``, the implicit form; then not again in this step's ``first_step``) or in
        ``first_step``."""
        if self._early_update_at == self._steps or not self.mask_source.wants_update(self._steps):
            return
        self._keep_for_undo()
        if early:
            self._early_update_at = self._steps
        elif self._found_inf is not None and bool(self._found_inf.item()):
            # Host sync, only on a mask-update step under a GradScaler: the ascent gradient is
            # not finite, so keep the masks and try again at the next step.
            return
        self._apply_source(self.mask_source.update(self.mask_context()))

    # A step that does not count (a GradScaler skipped its base step) leaves the mask schedule as
    # if it had not been tried: its mask update is undone (masks, the source's RNG and pending
    # state), so the next step makes the schedule's one update, from its own gradient, instead of
    # a second drop/grow round.
    def _keep_for_undo(self) -> None:
        masks = (dict(self._masks), dict(self._kind), dict(self._implicit_masks), dict(self._sparse_ok))
        source = copy.deepcopy(self.mask_source.state_dict())
        kept = {"masks": masks, "early": self._early_update_at, "frozen": set(self._frozen_at_masking)}
        self._mask_undo = (self._steps, kept, source)

    def _undo_mask_update(self) -> None:
        undo, self._mask_undo = self._mask_undo, None
        if undo is None or undo[0] != self._steps:  # none, or its step counted
            return
        _, kept, source = undo
        self._masks, self._kind, self._implicit_masks, self._sparse_ok = kept["masks"]
        self._early_update_at = kept["early"]
        self._frozen_at_masking = kept["frozen"]
        self.mask_source.load_state_dict(source)

    def _settle_deferred_step(self) -> None:
        """At the start of a step: the base step that the last ``second_step(base_step=False)``
        left to the caller never came (skipped by the caller's GradScaler): undo that step's update."""
        if self._step_deferred:
            self._step_deferred = False
            self._undo_mask_update()

    def _base_step(self, scaler: Any, before_base_step: Callable[[], Any] | None = None) -> None:
        self._base_step_run = True
        super()._base_step(scaler, before_base_step)

    def _after_step(self) -> None:
        # A step the GradScaler skipped (non-finite gradients: the base optimizer did not step)
        # does not count, as a skipped optimizer.step() does not count for an LR scheduler.
        if self._base_stepped:
            self._steps += 1
            self._mask_undo = None
        elif self._base_step_run:  # skipped: undo its mask update
            self._undo_mask_update()
        else:  # base step left to the caller (base_step=False): counted when it happens
            self._step_deferred = True

    # ------------------------------------------------------------------ checkpoints
    _STATE_KEYS: ClassVar[tuple[str, ...]] = (
        "steps",
        "norm",
        "form",
        "masks_ready",
        "masks",
        "mask_source_type",
        "mask_source",
    )

    def _settings(self) -> dict[str, Any]:
        return {**super()._settings(), "implicit_layers": self.implicit_layers}

    def _extra_state(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self._all_params())}
        return {
            **super()._extra_state(),
            "steps": self._steps,
            "norm": self.norm,
            "form": self.form,
            "masks_ready": self._masks_ready,
            "masks": _sharded.saved_masks(self._masks, index),  # FSDP2: sharded masks as DTensors
            "mask_source_type": type(self.mask_source).__name__,
            "mask_source": self.mask_source.state_dict(),
        }

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"the state dict's 'sparsam' entry must be a dict, got {type(extra).__name__}")
        kind = extra.get("type")
        if kind not in (None, "SSAM", type(self).__name__):  # subclasses: ScheduledSSAM, ESAM, ...
            if "masks" not in extra:
                raise ValueError(f"cannot load a {kind!r} state into {type(self).__name__}: it holds no masks")
            own = sorted(set(extra) - self._state_keys())
            raise ValueError(
                f"cannot load a {kind!r} state into {type(self).__name__}: it holds {kind}'s own state "
                f"({', '.join(map(str, own)) or 'none'}) besides the masks, which {type(self).__name__} would drop "
                f"(and {kind}'s schedule or variant would silently stop). Build {kind} with the same settings to load it"
            )
        if extra.get("form", self.form) != self.form:
            raise ValueError(f"checkpoint was saved with form={extra['form']!r}, this optimizer has form={self.form!r}")
        if "norm" in extra and extra["norm"] != self.norm:
            raise ValueError(f"checkpoint was saved with norm={extra['norm']!r}, this optimizer has norm={self.norm!r}")
        for key, what in (("masks", "masks"), ("mask_source", "mask source state")):
            if key not in extra:
                raise ValueError(
                    f"the SSAM state has no {key!r} entry (its {what}): loading it would leave SSAM without the "
                    "masks it was trained with. The state is damaged or was edited; load only the base optimizer's "
                    "state by removing the 'sparsam' entry, if that is what you want"
                )
        saved_source = extra.get("mask_source_type")
        if saved_source is not None and saved_source != type(self.mask_source).__name__:
            raise ValueError(
                f"the state's masks come from a {saved_source} mask source, this optimizer's mask source is "
                f"{type(self.mask_source).__name__}: build SSAM with mask={saved_source}(...) to load it"
            )
        if not isinstance(extra["masks"], Mapping) or not isinstance(extra["mask_source"], Mapping):
            raise TypeError("the SSAM state's 'masks' and 'mask_source' entries must be dicts")
        self.mask_source.check_state(extra["mask_source"])  # its settings: the built ones, or refused
        params = self._all_params()
        for i, m in extra["masks"].items():
            if isinstance(i, bool) or not isinstance(i, (int, str)) or not str(i).isdigit() or not int(i) < len(params):
                raise ValueError(
                    f"checkpoint has a mask for parameter index {i!r}, the optimizer has {len(params)} parameters"
                )
            p = params[int(i)]
            if not isinstance(m, Tensor) or m.shape != (p if _sharded.is_sharded(m) else _sharded.local(p)).shape:
                shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
                if _sharded.is_sharded(p):
                    raise ValueError(
                        f"checkpoint's mask for parameter {i} has shape {shape}, this rank's shard of it has shape "
                        f"{tuple(_sharded.local(p).shape)}: the state was saved with another world size or sharding "
                        "(load sharded checkpoints with torch.distributed.checkpoint, which reshards)"
                    )
                raise ValueError(
                    f"checkpoint's mask for parameter {i} has shape {shape}, the parameter has shape {tuple(p.shape)}: "
                    "the state was saved for a differently shaped model"
                )
            _sharded.loaded_mask(m, p)  # FSDP2: a sharded mask must be sharded as the parameter is now
        steps = extra.get("steps", 0)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"the SSAM state's step count must be an int >= 0, got {steps!r}")

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        self._check_extra_state(extra)
        params = self._all_params()
        masks = {
            params[int(i)]: _sharded.loaded_mask(m, params[int(i)]).to(torch.bool) for i, m in extra["masks"].items()
        }
        self.mask_source.load_state_dict(extra["mask_source"])
        self.set_masks(masks)
        self._masks_ready = bool(extra.get("masks_ready", True))
        self._steps = int(extra.get("steps", 0))

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", norm={self.norm!r}, form={self.form!r}, mask={self.mask_source!r})"


def _strip_wrapper_prefix(name: str) -> str:
    # DDP and torch.compile wrap the model: "module.layer.weight", "_orig_mod.layer.weight".
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def _broadcast_masks(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """Make every rank hold rank 0's masks: one flat uint8 broadcast (gloo has no bool)."""
    names = sorted(masks)
    if not names:
        return masks
    device = masks[names[0]].device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = torch.cat([masks[n].reshape(-1).to(device, torch.uint8) for n in names])
    dist.broadcast(flat, src=0)
    out, i = {}, 0
    for n in names:
        m = masks[n]
        out[n] = flat[i : i + m.numel()].view(m.shape).to(m.device, torch.bool)
        i += m.numel()
    return out


__all__ = ["SSAM"]
