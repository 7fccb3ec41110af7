"""The mask protocol: how a mask source talks to [`sparsam.SSAM`][sparsam.SSAM].

A *mask source* decides which coordinates SSAM perturbs. It is its own object (not part of the
optimizer), receives everything it needs explicitly through a
[`MaskContext`][sparsam.masks.MaskContext], and returns
masks as ``dict[str, torch.BoolTensor]`` keyed by parameter name. The optimizer stores the masks
(bool, one byte per coordinate), applies them, saves them in its ``state_dict`` and, under
``torch.distributed``, broadcasts them from rank 0 so every rank holds the same mask.

Lifecycle, driven by the optimizer:

1. ``init(ctx)`` once, at the first [`SSAM.first_step`][sparsam.SAM.first_step] (or an explicit
   [`SSAM.init_masks`][sparsam.SSAM.init_masks]) unless masks were loaded from a checkpoint or set by
   hand. The mask it returns is used from the very first step.
2. ``update(ctx)`` at the start of [`SSAM.first_step`][sparsam.SAM.first_step] of step ``t`` (``t`` =
   number of completed optimizer steps), whenever ``wants_update(t)`` is true, *after* the ascent
   gradient at ``w`` is in ``p.grad`` (and unscaled, under a GradScaler), so gradient-based sources can
   read ``ctx.grads``. Returning ``None`` keeps the current masks.
3. ``state_dict()`` / ``load_state_dict()`` hold the source's own state (schedules, RNG state) so a
   resumed run makes the same masks.

When the masks are made is the source's ``timing``:

* ``"before-step"`` (the library default): ``init`` makes a real mask before step 0, and updates
  run at the start of steps ``P, 2P, ...`` (``P`` = the update period), so each new mask already
  serves the step at which it is made.
* ``"after-step"`` (the authors' release, NeurIPS 2022 ``solver/sam.py``): a mask made at step
  ``t = 0, P, 2P, ...`` (epoch ``e`` with ``e % update_freq == 0``, batch 0) is made *after* that
  step's perturbation and serves from step ``t + 1`` on. Their SSAM-F starts from an all-zero mask,
  so its step 0 is an unperturbed step, i.e. a plain base-optimizer step with the gradient at
  ``w``; right after it they compute the Fisher mask from the model as that step left it. Their
  first epoch is therefore *not* plain SGD: only step 0 is. Here, ``FisherMask(timing=
  "after-step")`` returns all-False masks from ``init`` and recomputes at the start of steps
  ``1, P + 1, 2P + 1, ...`` (the same weights). Their SSAM-D starts from a random mask (used at
  step 0) and updates it from the gradient of steps ``0, P, 2P, ...``; ``DynamicMask(timing=
  "after-step")`` computes the new mask at those steps and hands it over one step later.

A parameter missing from a returned mask dict is not perturbed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_settings

LossFn = Callable[[Tensor, Tensor], Tensor]

TIMINGS = ("before-step", "after-step")


@dataclass
class MaskContext:
    """Everything a mask source may use, passed explicitly by the optimizer.

    Attributes:
        params: the perturbable parameters by name, in optimizer order (groups with ``rho > 0``).
        model: the model, if the user gave one to the optimizer (needed by data-driven sources).
        loss_fn: ``loss_fn(outputs, targets) -> mean loss of the batch``, if given.
        data: an iterable of ``(inputs, targets)`` batches, if given. Sources call ``iter(data)``
            each time they need data; a plain iterator is therefore consumed across updates.
        step: number of optimizer steps completed so far (0 before the first step).
        grads: the current ascent gradient at ``w`` by name (``p.grad``; absent when ``None``).
        masks: the masks currently held by the optimizer by name (empty before ``init``).
    """

    params: dict[str, Tensor]
    model: nn.Module | None = None
    loss_fn: LossFn | None = None
    data: Iterable[Any] | None = None
    step: int = 0
    grads: dict[str, Tensor] = field(default_factory=dict)
    masks: dict[str, Tensor] = field(default_factory=dict)


def check_sparsity(sparsity: float, *, allow_one: bool = True) -> float:
    """Validate a sparsity (fraction of coordinates NOT perturbed) and return it as a float."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1], got {sparsity!r}")
    s = float(sparsity)
    hi_ok = s <= 1.0 if allow_one else s < 1.0
    if not (0.0 <= s and hi_ok) or math.isnan(s):
        bound = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(f"sparsity must be in {bound} (fraction of coordinates not perturbed), got {sparsity!r}")
    return s


def check_timing(timing: str) -> str:
    """Validate a mask source's ``timing`` (``"before-step"`` or ``"after-step"``)."""
    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {TIMINGS}, got {timing!r}")
    return timing


class MaskSource(ABC):
    """Base class of mask sources (random, Fisher, dynamic, ...).

    Args:
        sparsity: fraction of coordinates NOT perturbed (the papers' meaning); density = 1 - sparsity.
        update_every: update the mask every this many optimizer steps (``None``: never update).
        update_every_epochs: alternatively, every this many epochs; needs ``steps_per_epoch``.
        steps_per_epoch: optimizer steps per epoch, used with ``update_every_epochs``.
        timing: ``"before-step"`` (default) or ``"after-step"`` (the authors'), see the module
            docstring. With ``"after-step"`` and no period, the single update runs at step 1.

    Capability flags (class attributes) tell the optimizer what a source needs:
    ``needs_grads`` (reads ``ctx.grads`` in ``update``) and ``needs_data`` (reads ``ctx.model``,
    ``ctx.loss_fn`` and ``ctx.data``).
    """

    needs_grads: bool = False
    needs_data: bool = False

    def __init__(
        self,
        sparsity: float,
        *,
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        timing: str = "before-step",
    ) -> None:
        self.sparsity = check_sparsity(sparsity)
        self.update_every = resolve_update_every(update_every, update_every_epochs, steps_per_epoch)
        self.timing = check_timing(timing)

    @abstractmethod
    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        """Return the first masks (bool tensors of each parameter's shape)."""

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        """Return new masks, or ``None`` to keep the current ones. Static sources keep them."""
        return None

    def wants_update(self, step: int) -> bool:
        """True when the optimizer should call [`update`][sparsam.masks.MaskSource.update] at the start
        of step ``step``.

        ``"before-step"``: steps ``P, 2P, ...``; ``"after-step"``: steps ``1, P + 1, 2P + 1, ...``
        (only step 1 without a period)."""
        if self.timing == "after-step":
            if step < 1:
                return False
            return step == 1 if self.update_every is None else (step - 1) % self.update_every == 0
        return self.update_every is not None and step > 0 and step % self.update_every == 0

    def settings(self) -> dict[str, Any]:
        """What this source was built with that decides its masks. Saved in ``state_dict``; on
        load the built settings are used and a saved value that differs is refused
        ([`check_state`][sparsam.masks.MaskSource.check_state])."""
        return {"sparsity": self.sparsity, "update_every": self.update_every, "timing": self.timing}

    def check_state(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` naming each setting whose saved value in ``state`` (from
        ``state_dict``) differs from this source's; change nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a {type(self).__name__} state must be a dict, got {type(state).__name__}")
        check_settings(f"{type(self).__name__} mask source", state, self.settings())

    def state_dict(self) -> dict[str, Any]:
        return self.settings()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load what the source has learned or drawn (RNG state, pending masks); its settings stay
        those it was built with, and a state made with other settings is refused."""
        self.check_state(state)

    def extra_repr(self) -> str:
        extra = ", timing='after-step'" if self.timing == "after-step" else ""
        return f"sparsity={self.sparsity}, update_every={self.update_every}{extra}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class SeededSource(MaskSource):
    """A mask source that draws from its own ``torch.Generator`` (never the global RNG).

    Subclasses call ``_seed`` in ``__init__``; the generator's state is part of
    ``state_dict`` so that a resumed run draws the same masks as an uninterrupted one.
    """

    seed: int
    generator: torch.Generator

    def _seed(self, seed: int) -> None:
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "seed": self.seed}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["rng"])


def resolve_update_every(
    update_every: int | None, update_every_epochs: int | None, steps_per_epoch: int | None
) -> int | None:
    """Turn the two ways of giving a mask-update period into a number of steps (or None)."""
    if update_every is not None and update_every_epochs is not None:
        raise ValueError(
            f"give update_every ({update_every!r}) or update_every_epochs ({update_every_epochs!r}), not both"
        )
    if update_every_epochs is not None:
        if not isinstance(update_every_epochs, int) or update_every_epochs < 1:
            raise ValueError(f"update_every_epochs must be a positive int, got {update_every_epochs!r}")
        if not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise ValueError(f"update_every_epochs needs steps_per_epoch as a positive int, got {steps_per_epoch!r}")
        return update_every_epochs * steps_per_epoch
    if update_every is not None and (not isinstance(update_every, int) or update_every < 1):
        raise ValueError(f"update_every must be a positive int or None, got {update_every!r}")
    return update_every


def ones_like_masks(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}


class AllOnesMask(MaskSource):
    """Perturb every coordinate: SSAM with this mask is exactly SAM."""

    def __init__(self) -> None:
        super().__init__(0.0)

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        return ones_like_masks(ctx.params)
