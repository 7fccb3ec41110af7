"""Sharpness-Aware Minimization (SAM) and Adaptive SAM (ASAM) around any PyTorch optimizer."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, ClassVar, Final, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .._checks import check_settings
from ..bn import no_running_stats
from . import _functional as kernels
from .. import _sharded
from .plain import base_step as base_step_kernel
from .plain import plain_step

PassKind = Literal["ascent", "descent", "measure"]
"""The passes of a step, as [`current_pass`][sparsam.SAM.current_pass] names them (``None``: a
plain pass, or no pass running)."""
ASCENT: Final = "ascent"
"""Pass 1 of a SAM step, at ``w``: its gradient decides the perturbation."""
DESCENT: Final = "descent"
"""Pass 2 of a SAM step, at ``w + e``: its gradient is the one the base optimizer steps on."""
MEASURE: Final = "measure"
"""ESAM's forward-only pass at ``w + e`` (under ``torch.no_grad()``): per-sample losses, no backward."""
_SAM_KEYS = ("rho", "adaptive", "eta")
STATE_VERSION = 2
"""Version of the ``"sparsam"`` entry of the optimizers' state dicts, checked on load. Version 2
added ``"settings"`` (a state of version 1 is read with ``settings=None``: not compared)."""
ASCENT_MODES = ("local", "sync")
"""The values of ``ascent=``: each rank perturbs with its own gradient, or with the all-reduced one."""
# Per-coordinate buffers of torch's optimizers: each has its parameter's shape (checked at load).
_PER_COORDINATE = frozenset(
    {
        "momentum_buffer",
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_inf",
        "square_avg",
        "grad_avg",
        "acc_delta",
        "sum",
        "prev",
        "step_size",
        "ax",
    }
)


# torch's count of the tensors holding a storage (private; without it nothing is exchanged).
_STORAGE_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _storage_shared(p: Tensor) -> bool:
    """Whether a tensor other than ``p`` holds ``p``'s storage (a buffer or attribute aliasing the
    weight, a kept ``state_dict()``, a view): after an exchange it would still read ``w`` in pass 2
    where the copy path gives it ``w + e``, so such a parameter is copied, not exchanged."""
    if _STORAGE_USE_COUNT is None:
        return True
    # p's own reference and the temporary storage object made here: 2 when nothing else holds it
    return bool(_STORAGE_USE_COUNT(p.untyped_storage()._cdata) > 2)


def _exchange(p: Tensor, other: Tensor) -> Tensor:
    """Give parameter ``p`` the storage of ``other``; return a tensor holding ``p``'s old storage.
    ``p`` stays the same object (optimizer state, hooks and modules keep referring to it)."""
    old = p.data
    p.data = other
    return old


def _check_rho(rho: Any) -> float:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or math.isnan(rho) or not 0.0 <= rho < math.inf:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    return float(rho)


def _check_group(group: Mapping[str, Any]) -> None:
    _check_rho(group["rho"])
    eta = group["eta"]
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta < math.inf:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not isinstance(group["adaptive"], bool):
        raise TypeError(f"adaptive must be a bool, got {group['adaptive']!r}")


def _is_davda54_state(state_dict: Mapping[str, Any]) -> bool:
    """A state dict saved by davda54/sam's ``SAM``: its per-parameter entries hold ``old_p`` (the
    weights kept during the perturbed pass), which no ``torch.optim`` optimizer and no sparsam
    state dict has."""
    state = state_dict.get("state")
    return isinstance(state, Mapping) and any(isinstance(v, Mapping) and "old_p" in v for v in state.values())


class SAM(Optimizer):
    r"""Sharpness-Aware Minimization around an existing optimizer (Foret et al., ICLR 2021).

    One step, with ``g = ∇L_B(w)`` from the clean pass (pass 1, "ascent"):

    ```text
    T   = |w| + eta   if adaptive (ASAM, Kwon et al. ICML 2021)   else 1
    e   = rho · T² g / (‖T g‖₂ + eps)        ‖·‖₂ over every gradient of every group with rho > 0
    w  ← w + e                                 (the old w is kept in a buffer)
    g' = ∇L_B(w + e)                           (pass 2, "descent")
    w  ← w                                     (restored exactly: exchanged back or copied, never by subtraction)
    w  ← base_optimizer.step(w, g')            (SGD, AdamW, ... on the perturbed gradient)
    ```

    ``rho``, ``adaptive`` and ``eta`` live in the shared ``param_groups`` and may differ per group;
    a group with ``rho = 0`` is neither perturbed nor counted in the norm. The norm is one global
    norm over all perturbed groups; each group scales by its own ``rho``.

    Args:
        params_or_optimizer: an already-built ``torch.optim.Optimizer`` (its ``param_groups`` and
            ``state`` are shared, so LR schedulers and checkpoints of the base keep working), or
            parameters / param groups, in which case ``base_optimizer_cls(params, **base_kwargs)``
            is built (the ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1)`` migration form).
        base_optimizer_cls: the base optimizer class, only with parameters. With ``rho`` and
            ``adaptive`` it may be given by position, as in davda54/sam:
            ``SAM(params, torch.optim.SGD, 0.05, False, lr=0.1)``.
        base_optimizer: the same class under davda54/sam's keyword
            (``SAM(params, base_optimizer=torch.optim.SGD, lr=0.1)``); give one of the two.
        rho: neighbourhood radius (default for groups that do not set it).
        adaptive: ASAM with ``T = |w| + eta``. The ``eta`` offset lets zero-initialised weights
            (biases) move; davda54/sam's ASAM uses ``T = |w|`` and cannot perturb them.
        eta: ASAM offset.
        eps: added to the norm before dividing (1e-12, as davda54/sam).
        foreach: use the multi-tensor kernels (default ``None`` = yes). The for-loop kernels are
            the reference; both give bitwise-identical results on the CPU.
        model: optional. Used only by the pass contexts: [`descent_pass`][sparsam.SAM.descent_pass]
            stops BatchNorm running statistics from updating at ``w + e``, and under DDP with
            ``ascent="local"`` [`ascent_pass`][sparsam.SAM.ascent_pass] runs pass 1 inside
            ``model.no_sync()``. [`step`][sparsam.SAM.step] uses both.
        ascent: ``"local"`` (each data-parallel worker perturbs with its own gradient, as in the
            SAM paper's m-sharpness; pass 1 needs no all-reduce) or ``"sync"`` (pass 1 gradients
            are all-reduced, so every rank applies the same perturbation).
        max_grad_norm: if set, the descent gradient is clipped to this global L2 norm (after
            unscaling under a GradScaler) right before the base step. Clipping the ascent
            gradient would not change ``e`` (it is normalised), so it is not done.
        exchange: where a parameter owns its storage (a plain tensor, not a view into a larger
            buffer, not a tensor subclass such as FSDP2's DTensor, and no other tensor holds its
            storage, as a buffer aliasing the weight would), write ``w + e`` into the
            spare buffer and exchange the two storages for pass 2 (``p.data``), so ``w`` is never
            copied and the restore is an exchange back: exact, and about half the optimizer's
            extra memory traffic (``docs/benchmarks.md``). ``False`` copies ``w`` and copies it
            back. Turn it off if something holds the parameter's storage address across the two
            passes (CUDA graphs captured around the forward re-record when it changes).
        **base_kwargs: arguments of ``base_optimizer_cls``.

    Two ways to drive it:

    ```python
    # closure: called twice; it must compute the loss AND call backward
    def closure():
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)            # loss at the unperturbed weights

    # two-step loop
    with opt.ascent_pass():
        loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    with opt.descent_pass():
        loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    ```

    Mixed precision: with a ``torch.amp.GradScaler`` pass ``grad_scaler=`` to ``first_step`` (it
    is remembered for ``second_step``) or to ``step``. ``first_step`` unscales the ascent gradient
    itself and, if it is not finite, perturbs nothing; ``second_step`` then makes the scaler skip
    the base step (weights, momentum and Adam moments stay exactly as before) and ``update()``
    lowers the scale as usual. No host synchronisation happens inside ``first_step``; the
    scaler's own ``step`` synchronises once, as for any optimizer. A whole step may run inside one
    ``torch.autocast`` region: the region's cache of low-precision weight casts is cleared after
    the perturbation and after the restore, so pass 2 casts ``w + e``.

    Order inside one step: pass 1 → [unscale] → perturb → pass 2 → restore → [unscale → clip] →
    base step. Call an LR scheduler after the whole step, as for any optimizer.
    """

    def __init__(
        self,
        params_or_optimizer: Any,
        base_optimizer_cls: type[Optimizer] | None = None,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        base_optimizer: type[Optimizer] | None = None,
        eta: float = 0.01,
        eps: float = 1e-12,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        ascent: str = "local",
        max_grad_norm: float | None = None,
        exchange: bool = True,
        **base_kwargs: Any,
    ) -> None:
        if base_optimizer is not None:  # davda54/sam's keyword: SAM(params, base_optimizer=torch.optim.SGD, ...)
            if base_optimizer_cls is not None:
                raise TypeError(
                    f"SAM got the base optimizer class twice: {base_optimizer_cls!r} (second argument) and "
                    f"base_optimizer={base_optimizer!r}; give it once"
                )
            base_optimizer_cls = base_optimizer
        if isinstance(params_or_optimizer, Optimizer):
            if isinstance(base_optimizer_cls, (int, float)) and not isinstance(base_optimizer_cls, bool):
                raise TypeError(
                    f"SAM(optimizer, {base_optimizer_cls!r}): with a built optimizer rho is a keyword, "
                    f"SAM(optimizer, rho={base_optimizer_cls!r})"
                )
            if base_optimizer_cls is not None or base_kwargs:
                raise TypeError(
                    "SAM(optimizer, ...) wraps an already-built optimizer; base_optimizer_cls "
                    f"({base_optimizer_cls!r}) and base optimizer kwargs ({sorted(base_kwargs)}) "
                    "are only accepted with parameters"
                )
            if isinstance(params_or_optimizer, SAM):
                raise TypeError("SAM cannot wrap another SAM optimizer")
            base = params_or_optimizer
        else:
            if base_optimizer_cls is None:
                raise TypeError(
                    "SAM(params, ...) needs the base optimizer class, e.g. SAM(params, torch.optim.SGD, lr=0.1) "
                    "or SAM(params, base_optimizer=torch.optim.SGD, lr=0.1) (base_optimizer_cls= works too); "
                    f"got params of type {type(params_or_optimizer).__name__} and no class"
                )
            if isinstance(base_optimizer_cls, Optimizer):
                raise TypeError(
                    f"SAM(params, base_optimizer) takes the optimizer class, got a built "
                    f"{type(base_optimizer_cls).__name__}; to wrap a built optimizer pass it alone: "
                    "SAM(optimizer, rho=...)"
                )
            if not (isinstance(base_optimizer_cls, type) and issubclass(base_optimizer_cls, Optimizer)):
                raise TypeError(
                    f"base_optimizer_cls must be a torch.optim.Optimizer subclass, got {base_optimizer_cls!r}"
                )
            base = base_optimizer_cls(params_or_optimizer, **base_kwargs)
        if not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        if ascent not in ASCENT_MODES:
            raise ValueError(f"ascent must be one of {ASCENT_MODES}, got {ascent!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self._sam_defaults = {"rho": _check_rho(rho), "adaptive": adaptive, "eta": eta}
        _check_group(self._sam_defaults)
        self.base_optimizer = base
        self.eps = float(eps)
        self.foreach = foreach
        self.model = model
        self.ascent = ascent
        self.max_grad_norm = max_grad_norm
        self.exchange = bool(exchange)
        self._backup: dict[Tensor, Tensor] = {}  # transient: w during the perturbed pass
        self._perturbed: list[Tensor] = []  # params currently at w + e
        self._exchanged: list[bool] = []  # per entry of _perturbed: w + e is in the spare's storage
        self._in_perturbation = False
        self._found_inf: Tensor | None = None
        self._scaler: Any = None
        self._compute = 0.0  # forward+backward passes so far, in SGD-step equivalents (see compute)
        # Optimizer.__init__ calls self.add_param_group for every group; ours recognises the
        # base's own groups and only adds the SAM settings to them.
        super().__init__(base.param_groups, {**base.defaults, **self._sam_defaults})
        self._relink()
        _sharded.check_not_fsdp1((p for g in self.param_groups for p in g["params"]), model)

    # ------------------------------------------------------------------ groups and state sharing
    def _relink(self) -> None:
        """Share the base optimizer's ``param_groups`` and ``state`` (the same objects)."""
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            for k, v in self._sam_defaults.items():
                group.setdefault(k, v)
            _check_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not any(param_group is g for g in self.base_optimizer.param_groups):
            self.base_optimizer.add_param_group(param_group)
            param_group = self.base_optimizer.param_groups[-1]
        for k, v in self._sam_defaults.items():
            param_group.setdefault(k, v)
        _check_group(param_group)
        _sharded.check_not_fsdp1(param_group["params"])

    def __getstate__(self) -> dict[str, Any]:  # pickling: the transient buffers are not state
        if self._in_perturbation:  # the copy would hold w + e and no w to go back to
            raise RuntimeError(
                "pickling or copying the optimizer between first_step() and second_step(): the weights are at "
                "w + e; finish the step or restore() first"
            )
        state = self.__dict__.copy()
        state["_backup"] = {}
        return state

    # ------------------------------------------------------------------ hooks for subclasses
    def _mask_of(self, p: Tensor) -> tuple[bool, Tensor | None]:
        """(is p perturbed at all, bool mask or None for all-ones). SAM perturbs everything."""
        return True, None

    def _use_masked_norm(self) -> bool:
        return False

    def _before_perturb(self) -> None:
        """Called in [`first_step`][sparsam.SAM.first_step] once the ascent gradient is unscaled (SSAM:
        masks)."""

    def _after_step(self) -> None:
        """Called at the end of [`second_step`][sparsam.SAM.second_step]."""

    def _pass_cost(self, kind: PassKind) -> float:
        """What the pass before [`first_step`][sparsam.SAM.first_step] (``kind="ascent"``) or
        [`second_step`][sparsam.SAM.second_step] (``"descent"``) cost, in forward+backward passes
        over the whole batch: 1.0 for SAM; a variant whose pass uses part of the batch returns less."""
        return 1.0

    @property
    def compute(self) -> float:
        """Training compute so far in SGD-step equivalents: forward+backward passes over a whole
        batch, counted (not timed) by the optimizer: a SAM step adds 2, a step that runs one pass
        adds 1, a pass over a fraction f of the batch adds f (a forward-only pass over the batch
        adds 1/3, a backward costing about twice a forward). Saved in
        [`state_dict`][sparsam.SAM.state_dict], so a resumed run continues the count."""
        return self._compute

    # ------------------------------------------------------------------ the two passes
    _current_pass: PassKind | None = None

    @property
    def current_pass(self) -> PassKind | None:
        """Which pass runs now: ``"ascent"`` inside [`ascent_pass`][sparsam.SAM.ascent_pass] (at
        ``w``), ``"descent"`` inside [`descent_pass`][sparsam.SAM.descent_pass] (at ``w + e``),
        ``None`` otherwise, which includes a step that runs one plain pass. Read-only. ESAM adds
        ``"measure"``: a forward-only pass at ``w + e`` under ``torch.no_grad()`` in which the
        closure records per-sample losses and calls no ``backward`` (see ``docs/variants.md``).

        A closure given to [`step`][sparsam.SAM.step] reads it to keep side effects to the clean
        pass (``current_pass in (None, "ascent")``: training statistics, logging) and to know whether
        its gradient is all-reduced (in ``"ascent"`` with ``ascent="local"`` it is not)."""
        return self._current_pass

    @property
    def batch_fraction(self) -> float:
        """The fraction of its batch a closure should use in the current pass (its first
        ``ceil(fraction · n)`` samples): 1.0 for SAM. A subclass whose ascent uses part of the
        batch returns less while ``current_pass == "ascent"``."""
        return 1.0

    @property
    def batch_index(self) -> Tensor | None:
        """The samples of its batch a closure should use in the current pass, as an index tensor
        (``x[opt.batch_index]``), or ``None`` for all of them (then [`batch_fraction`][sparsam.SAM.batch_fraction]
        applies): ``None`` for SAM. ESAM's data selection sets it in its descent pass."""
        return None

    @property
    def wants_sample_losses(self) -> bool:
        """True when the closure should hand the per-sample losses of the samples it used to
        [`record_sample_losses`][sparsam.SAM.record_sample_losses] (ESAM's data selection, in its
        ascent pass and its forward-only ``"measure"`` pass). Always False for SAM."""
        return False

    def record_sample_losses(self, losses: Tensor) -> None:
        """Receive the per-sample losses of the current pass (a 1-D tensor, one per sample, in the
        batch's order). SAM ignores them; see [`wants_sample_losses`][sparsam.SAM.wants_sample_losses]."""

    @property
    def selects_samples(self) -> bool:
        """True when the optimizer chooses the samples of its descent pass from per-sample losses
        (ESAM with ``gamma < 1``): a closure must then be able to give one loss per sample. Always
        False for SAM."""
        return False

    def ascends_next(self) -> bool:
        """Will the next [`step`][sparsam.SAM.step] run the ascent pass? True for SAM; a variant
        answers False for the steps it takes as one plain pass (a schedule's off-steps) or when it
        has no ascent pass at all (MSAM). A framework that runs an accumulation window's early
        micro-batches ahead of ``step`` asks it (see
        [`accumulation_pass`][sparsam.SAM.accumulation_pass])."""
        return True

    def accumulation_pass(self) -> AbstractContextManager[None]:
        """The context of a micro-batch that an accumulation window runs ahead of
        [`step`][sparsam.SAM.step] (the window's last micro-batch goes through ``step``, the
        earlier ones only accumulate their gradient): [`ascent_pass`][sparsam.SAM.ascent_pass] when
        the next step ascends, otherwise the weights of the step's one pass: ``w`` as they are for
        a plain step (nothing to do); a variant whose one pass runs elsewhere overrides it (MSAM:
        its perturbed weights)."""
        return self.ascent_pass() if self.ascends_next() else nullcontext()

    @contextmanager
    def _in_pass(self, name: PassKind | None) -> Iterator[None]:
        previous, self._current_pass = self._current_pass, name
        try:
            yield
        finally:
            self._current_pass = previous

    @contextmanager
    def ascent_pass(self) -> Iterator[None]:
        """Context for pass 1 (forward + backward at ``w``); sets ``current_pass = "ascent"``.

        Under DDP with ``ascent="local"`` it runs inside ``model.no_sync()``, so each rank keeps
        its own gradient; otherwise it does nothing. BatchNorm statistics update here as usual.
        """
        model: Any = self.model
        ctx = model.no_sync() if self.ascent == "local" and hasattr(model, "no_sync") else nullcontext()
        with ctx, self._in_pass(ASCENT):
            yield

    @contextmanager
    def descent_pass(self) -> Iterator[None]:
        """Context for pass 2 (forward + backward at ``w + e``); sets ``current_pass = "descent"``.
        BatchNorm running statistics are not updated (they come from the clean pass only). Needs ``model=``."""
        with no_running_stats(self.model), self._in_pass(DESCENT):
            yield

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Move every perturbed parameter to ``w + e`` using the gradient in ``p.grad``.

        Args:
            zero_grad: clear the gradients afterwards (ready for pass 2).
            grad_scaler: a ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` produced the
                gradients; they are unscaled in place here.
        """
        if self._in_perturbation:
            raise RuntimeError("first_step() was called twice without second_step(): the weights are already at w + e")
        # FSDP1 applied after the optimizer was built (use_orig_params=True keeps the parameter objects)
        _sharded.check_not_fsdp1(p for g in self.param_groups for p in g["params"])
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else None
        self._scaler = scaler
        self._found_inf = self._unscale_ascent_grads(scaler) if scaler is not None else None
        mesh = _sharded.first_mesh(p for g in self.param_groups for p in g["params"]) if scaler is not None else None
        if mesh is not None and self._found_inf is not None:  # FSDP2: an overflow in any rank's shard counts everywhere
            self._found_inf = _sharded.reduce_max(self._found_inf, mesh)
        self._before_perturb()

        use_masked = self._use_masked_norm()
        foreach = self.foreach is not False
        plan = []
        terms: list[Tensor] = []
        for group in self.param_groups:
            rho = _check_rho(group["rho"])
            if rho == 0.0:
                continue
            adaptive, eta = group["adaptive"], group["eta"]
            ps, gs, ms, owned = [], [], [], []  # perturbed
            norm_ps, norm_gs, norm_ms = [], [], []  # counted in the norm
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SAM does not support sparse gradients")
                active, m = self._mask_of(p)
                lp, lg = _sharded.local(p), _sharded.local(p.grad)  # FSDP2: this rank's shards
                if active:
                    ps.append(lp)
                    gs.append(lg)
                    ms.append(m)
                    owned.append(lp is p)  # a shard is FSDP's storage, read by its all-gather: never exchanged
                if active or not use_masked:
                    norm_ps.append(lp)
                    norm_gs.append(lg)
                    norm_ms.append(m if use_masked else None)
            if norm_gs:
                terms += kernels.norm_terms(norm_ps, norm_gs, norm_ms, adaptive=adaptive, eta=eta, foreach=foreach)
            if ps:
                plan.append((rho, adaptive, eta, ps, gs, ms, owned))

        perturbed: list[Tensor] = []
        exchanged: list[bool] = []
        if plan:
            norm = kernels.global_norm(terms)
            mesh = _sharded.sharding_of(
                p for g in self.param_groups if g["rho"] > 0 for p in g["params"] if p.grad is not None
            )
            if mesh is not None:  # the norm over every shard on every rank: one all-reduce
                norm = _sharded.reduce_norm(norm, mesh)
            for rho, adaptive, eta, ps, gs, ms, owned in plan:
                scale = rho / (norm + self.eps)
                if self._found_inf is not None:  # non-finite ascent gradient: e = 0 (no host sync)
                    scale = torch.where(self._found_inf.to(scale.device) > 0, torch.zeros_like(scale), scale)
                swap = self._move_to_perturbed(ps, gs, ms, owned, scale, adaptive=adaptive, eta=eta)
                perturbed += ps
                exchanged += swap
        self._perturbed = perturbed
        self._exchanged = exchanged
        # A step run inside one autocast region: its cache of low-precision casts of the weights
        # (keyed by the parameter, not its values) still holds w's, so pass 2 would run at w.
        torch.clear_autocast_cache()
        self._in_perturbation = True
        self._compute += self._pass_cost(ASCENT)
        if zero_grad:
            self.zero_grad()

    def _move_to_perturbed(
        self,
        ps: list[Tensor],
        ds: list[Tensor],
        ms: list[Tensor | None],
        owned: list[bool],
        scale: Tensor,
        *,
        adaptive: bool = False,
        eta: float = 0.0,
    ) -> list[bool]:
        """Move the parameters ``ps`` (local shards) to ``w + scale · m ⊙ T² d``, keeping ``w`` for the
        exact restore (storage exchange where allowed, else a copy); return, per parameter, whether
        it was exchanged. ``owned[i]``: ``ps[i]`` is the parameter itself, not an FSDP2 shard."""
        foreach = self.foreach is not False
        spares = [self._backup_for(p) for p in ps]
        # A parameter listed twice in a group (torch only warns) is copied: a second
        # exchange would hand it the spare again and lose w.
        once = Counter(map(id, ps))
        swap = [o and once[id(p)] == 1 and self._exchangeable(p, b) for p, b, o in zip(ps, spares, owned)]
        # Exchanged: w + e is written into the spare, w stays in place. Copied: w goes into
        # the spare and w + e is written over it.
        kernels.copy_(
            [b for b, x in zip(spares, swap) if not x], [p for p, x in zip(ps, swap) if not x], foreach=foreach
        )
        srcs = [p if x else b for p, b, x in zip(ps, spares, swap)]
        dsts = [b if x else p for p, b, x in zip(ps, spares, swap)]
        kernels.add_perturbation(srcs, ds, ms, dsts, scale, adaptive=adaptive, eta=eta, foreach=foreach)
        for p, b, x in zip(ps, spares, swap):
            if x:
                self._backup[p] = _exchange(p, b)
        return swap

    @torch.no_grad()
    def second_step(
        self,
        zero_grad: bool = False,
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> None:
        """Restore ``w`` exactly and take the base optimizer's step with the gradient in ``p.grad``
        (computed at ``w + e``). Uses the GradScaler given to [`first_step`][sparsam.SAM.first_step]
        unless another is given here.

        Args:
            zero_grad: clear the gradients afterwards.
            grad_scaler: as for ``first_step``.
            before_base_step: called right before the base step, once ``w`` is restored and the
                descent gradient unscaled (and clipped with ``max_grad_norm``): where a framework
                runs its own hooks and gradient clipping.
            base_step: ``False`` restores ``w`` and leaves the base step to the caller (under a
                GradScaler an overflowed ascent is marked in the gradient, so the caller's
                ``scaler.step`` skips)."""
        if not self._in_perturbation:
            raise RuntimeError("second_step() was called before first_step(): there is no perturbation to undo")
        self._restore_weights()
        self._in_perturbation = False
        scaler = grad_scaler if grad_scaler is not None and grad_scaler.is_enabled() else self._scaler
        found_inf, self._found_inf, self._scaler = self._found_inf, None, None
        if scaler is not None and found_inf is not None:
            self._poison_descent_grads(found_inf)
        if base_step:
            self._base_step(scaler, before_base_step)
        self._after_step()
        self._compute += self._pass_cost(DESCENT)
        # An LR scheduler built on this optimizer patches step() to record that the optimizer has
        # stepped; the two-step API never calls step(), so record it here, or the scheduler warns
        # that lr_scheduler.step() came first.
        self._opt_called = True
        if zero_grad:
            self.zero_grad()

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> Any:
        """One SAM step with standard closure semantics: the one place where the passes happen.

        ``closure()`` must compute the loss and call ``backward()`` (through the GradScaler, if
        one is given). It is called twice: at ``w`` inside [`ascent_pass`][sparsam.SAM.ascent_pass]
        (``current_pass == "ascent"``), then at ``w + e`` inside
        [`descent_pass`][sparsam.SAM.descent_pass] (``current_pass == "descent"``). Gradients are
        cleared between the passes; not before the first (clear them before calling ``step``, or
        accumulate into them). Returns the first call's result: the loss at ``w``. The engine of
        ``sparsam train``, the Lightning callback and the Accelerate helper each make this one call;
        a variant that changes the sequence overrides it (see ``docs/design.md``).

        Args:
            closure: see above. It may read [`current_pass`][sparsam.SAM.current_pass] and
                [`batch_fraction`][sparsam.SAM.batch_fraction].
            grad_scaler: a ``torch.amp.GradScaler`` (see the class docstring).
            before_base_step, base_step: as for [`second_step`][sparsam.SAM.second_step].
        """
        if closure is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure that computes the loss and calls backward "
                "(it is evaluated twice); for a hand-written loop use first_step() / second_step()"
            )
        closure = torch.enable_grad()(closure)
        with self.ascent_pass():
            loss = closure()
        self.first_step(zero_grad=True, grad_scaler=grad_scaler)
        try:
            with self.descent_pass():
                closure()
        except BaseException:  # KeyboardInterrupt included: never leave the weights at w + e
            self.restore()
            raise
        self.second_step(grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step)
        return loss

    def _base_step(self, scaler: Any, before_base_step: Callable[[], Any] | None = None) -> None:
        """[unscale →] [clip →] [hook →] the base optimizer's step (through ``scaler`` if given)."""
        base_step_kernel(
            self.base_optimizer,
            self.param_groups,
            scaler=scaler,
            max_grad_norm=self.max_grad_norm,
            foreach=self.foreach is not False,
            before_base_step=before_base_step,
        )

    def _plain_step(
        self,
        closure: Callable[[], Any],
        *,
        grad_scaler: Any = None,
        before_base_step: Callable[[], Any] | None = None,
        base_step: bool = True,
    ) -> Any:
        """A step without perturbation, for variants that skip the ascent on some steps: the
        [plain step][sparsam.optim.plain.plain_step] (the closure once at ``w`` with
        ``current_pass`` ``None``, one pass added to [`compute`][sparsam.SAM.compute], the
        ``_after_plain_pass`` hook, then [unscale, clip, hook and] the base step). Returns the
        closure's result."""
        loss = plain_step(
            self, closure, grad_scaler=grad_scaler, before_base_step=before_base_step, base_step=base_step
        )
        self._opt_called = True
        return loss

    def _after_plain_pass(self) -> None:
        """Called in [`_plain_step`][sparsam.optim.plain.plain_step] after the closure, before the
        base step (LookSAM adds its stored component to the gradient here)."""

    @torch.no_grad()
    def restore(self) -> bool:
        """Undo [`first_step`][sparsam.SAM.first_step]: copy every perturbed parameter back to
        ``w`` exactly, without a base step. For a two-step loop interrupted between the two steps
        (an exception in pass 2); [`step`][sparsam.SAM.step] and
        [`perturbed`][sparsam.SAM.perturbed] call it themselves. ``p.grad`` keeps whatever the
        interrupted pass left there: clear it before the next step. Returns ``True`` if there was
        a perturbation to undo, ``False`` (doing nothing) otherwise."""
        if not self._in_perturbation:
            return False
        self._restore_weights()
        self._in_perturbation = False
        self._found_inf, self._scaler = None, None
        return True

    @contextmanager
    def perturbed(self, *, zero_grad: bool = True, grad_scaler: Any = None) -> Iterator[None]:
        """The two-step API as one context: [`first_step`][sparsam.SAM.first_step] on entry, the
        body is pass 2 (inside [`descent_pass`][sparsam.SAM.descent_pass]), and on a normal exit
        [`second_step`][sparsam.SAM.second_step]. On any exception (``KeyboardInterrupt``
        included) the weights are restored to ``w`` (no base step) and the exception propagates.

        Args:
            zero_grad: clear the gradients after ``first_step`` (so pass 2 starts from zero) and
                after ``second_step``.
            grad_scaler: as for ``first_step``.

        ```python
        import torch
        import torch.nn.functional as F
        from torch import nn
        from sparsam import SAM

        net = nn.Linear(4, 3)
        x, y = torch.randn(8, 4), torch.arange(8) % 3
        opt = SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=net)
        with opt.ascent_pass():
            F.cross_entropy(net(x), y).backward()
        with opt.perturbed():  # the weights are at w + e in here
            F.cross_entropy(net(x), y).backward()
        ```
        """
        self.first_step(zero_grad=zero_grad, grad_scaler=grad_scaler)
        try:
            with self.descent_pass():
                yield
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=zero_grad, grad_scaler=grad_scaler)

    # ------------------------------------------------------------------ helpers
    def _restore_weights(self) -> None:
        """Every perturbed parameter back to ``w`` exactly: an exchange of storages back, or a copy."""
        copied = [p for p, x in zip(self._perturbed, self._exchanged) if not x]
        kernels.restore_(copied, [self._backup[p] for p in copied], foreach=self.foreach is not False)
        for p, x in zip(self._perturbed, self._exchanged):
            if x:
                self._backup[p] = _exchange(p, self._backup[p])
        self._perturbed, self._exchanged = [], []
        torch.clear_autocast_cache()  # the casts of w + e (see first_step)

    def _exchangeable(self, p: Tensor, spare: Tensor) -> bool:
        """Whether pass 2 may run on ``spare``'s storage exchanged into ``p`` (see ``exchange``)."""
        return (
            self.exchange
            and type(p) in (Tensor, nn.Parameter)  # not a subclass: DTensor, FSDP1's FlatParameter, ...
            and p.storage_offset() == 0
            # owns all of its storage: not a view into a flat buffer that a wrapper reads instead
            and p.untyped_storage().nbytes() == p.numel() * p.element_size()
            and spare.stride() == p.stride()
            and not _storage_shared(p)
        )

    def _backup_for(self, p: Tensor) -> Tensor:
        b = self._backup.get(p)
        if b is None or b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or b.stride() != p.stride():
            b = torch.empty_like(p, memory_format=torch.preserve_format)
            self._backup[p] = b
        return b

    def _grads(self) -> list[Tensor]:
        return [_sharded.local(p.grad) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _unscale_ascent_grads(self, scaler: Any) -> Tensor:
        scale = getattr(scaler, "_scale", None)
        if scale is None:
            raise RuntimeError(
                "first_step(grad_scaler=...) was called before grad_scaler.scale(loss).backward(): "
                "the scaler has no scale yet"
            )
        inv_scale = scale.double().reciprocal().float()
        found_inf = torch.zeros((), dtype=torch.float32, device=scale.device)
        by_device: dict[torch.device, list[Tensor]] = {}
        for g in self._grads():
            by_device.setdefault(g.device, []).append(g)
        for dev, grads in by_device.items():
            f = torch.zeros(1, dtype=torch.float32, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, f, inv_scale.to(dev))
            found_inf += f.to(found_inf.device).reshape(())
            # When found_inf > 0 these finite stand-ins are multiplied by a zero scale: e = 0.
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        return found_inf

    def _poison_descent_grads(self, found_inf: Tensor) -> None:
        # The ascent gradient was not finite: make the scaler see a non-finite descent gradient as
        # well, so it skips the base step and lowers the scale, without a host sync here.
        for g in self._grads():
            if g.numel():
                flat = g.view(-1)[:1]
                flat.add_(
                    torch.where(found_inf.to(g.device) > 0, torch.tensor(math.inf, device=g.device), 0.0).to(g.dtype)
                )
                return

    # ------------------------------------------------------------------ checkpoints
    # The keys of the "sparsam" entry that each class adds (the union over the class's MRO is what
    # it writes and, for a state of its own type, requires: see _state_keys), and the keys added
    # after version 1: key -> (the version that added it, the value a state of an older version gets).
    _STATE_KEYS: ClassVar[tuple[str, ...]] = ("version", "type", "base", "compute", "settings")
    _STATE_ADDED: ClassVar[dict[str, tuple[int, Any]]] = {"settings": (2, None)}

    def _settings(self) -> dict[str, Any]:
        """Settings outside the parameter groups that change the result, saved under ``"settings"``
        and compared on load (see [`load_state_dict`][sparsam.SAM.load_state_dict]); subclasses
        add theirs."""
        return {"eps": self.eps, "ascent": self.ascent, "max_grad_norm": self.max_grad_norm}

    def _check_settings(self, extra: Mapping[str, Any]) -> None:
        """Refuse a state made with settings (outside the parameter groups) other than this
        optimizer's, naming each with both values; change nothing."""
        check_settings(type(self).__name__, extra.get("settings"), self._settings())

    @classmethod
    def _state_keys(cls, version: int = STATE_VERSION) -> set[str]:
        """The keys of the ``"sparsam"`` entry that this class writes at state version ``version``."""
        keys: set[str] = set()
        added: dict[str, tuple[int, Any]] = {}
        for klass in cls.__mro__:
            keys.update(vars(klass).get("_STATE_KEYS", ()))
            added.update(vars(klass).get("_STATE_ADDED", {}))
        return {k for k in keys if added.get(k, (1, None))[0] <= version}

    def _checked_version(self, extra: Any) -> dict[str, Any]:
        """The ``"sparsam"`` entry checked for its version and, when it was written by this class
        or one it extends, for its keys; a state of an older version comes back migrated (with a
        warning naming what was filled in). Raises naming the key or the version; changes nothing."""
        if not isinstance(extra, Mapping):
            raise TypeError(f"the state dict's 'sparsam' entry must be a dict, got {type(extra).__name__}")
        version = extra.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise ValueError(
                f"the state's 'sparsam' entry has version={version!r}, not a state version (an int from 1 to "
                f"{STATE_VERSION}): it was not written by sparsam's state_dict() or was edited; it is not loaded"
            )
        if not 1 <= version <= STATE_VERSION:
            why = "it was written by a newer sparsam: upgrade sparsam to load it"
            if version < 1:
                why = "no sparsam writes it"
            raise ValueError(
                f"the state's 'sparsam' entry has version {version}; this sparsam reads state versions 1 to "
                f"{STATE_VERSION}: {why}. It is not loaded"
            )
        kind = extra.get("type")
        if not isinstance(kind, str):
            raise ValueError(
                f"the state's 'sparsam' entry (version {version}) has type={kind!r}, not the name of the optimizer "
                "that wrote it: it was not written by sparsam's state_dict() or was edited; it is not loaded"
            )
        saved_cls = next((k for k in type(self).__mro__ if k.__name__ == kind and issubclass(k, SAM)), None)
        if saved_cls is not None:  # this class or one it extends: the keys it writes are known
            missing = sorted(saved_cls._state_keys(version) - set(extra))
            unknown = sorted(map(str, set(extra) - saved_cls._state_keys()))
            if missing:
                renamed = ""
                if unknown:
                    renamed = f" It holds {', '.join(map(repr, unknown))} instead, which {kind} does not write."
                raise ValueError(
                    f"the {kind} state (state version {version}) has no {', '.join(map(repr, missing))} entry: read "
                    f"without it, what it holds would silently start over.{renamed} The state is damaged or was "
                    "edited; it is not loaded"
                )
            if unknown:
                raise ValueError(
                    f"the {kind} state (state version {version}) holds {', '.join(map(repr, unknown))}, which {kind} "
                    f"does not write at version {version}: the state is damaged or was edited (or written by another "
                    "class of the same name); it is not loaded"
                )
        out = dict(extra)
        filled = []
        for klass in type(self).__mro__:
            for key, (added_in, default) in vars(klass).get("_STATE_ADDED", {}).items():
                if version < added_in and key not in out:
                    out[key] = default
                    filled.append(f"{key}={default!r}")
        if filled:
            warnings.warn(
                f"this {kind} state was written by an older sparsam (state version {version}); it is read as version "
                f"{STATE_VERSION} with {', '.join(filled)}. Save it again to store it as version {STATE_VERSION}",
                UserWarning,
                stacklevel=3,
            )
        out["version"] = STATE_VERSION
        return out

    def _extra_state(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "type": type(self).__name__,
            "base": type(self.base_optimizer).__name__,
            "compute": self._compute,
            "settings": self._settings(),
        }

    def _check_extra_state(self, extra: Mapping[str, Any]) -> None:
        """Raise if ``extra`` (the ``"sparsam"`` entry) cannot be loaded here; change nothing."""
        if not isinstance(extra, Mapping):
            raise TypeError(f"the state dict's 'sparsam' entry must be a dict, got {type(extra).__name__}")
        kind = extra.get("type")
        unknown = sorted(map(str, set(extra) - self._state_keys()))
        if kind not in (None, type(self).__name__) and unknown:
            hint = " Load it into SSAM (with the same mask source)." if kind == "SSAM" else ""
            raise ValueError(
                f"this state was saved by {kind}, whose own state ({', '.join(map(str, unknown))}) "
                f"{type(self).__name__} would drop: the masks and mask schedule would be lost.{hint} To take only the "
                "base optimizer's state, remove the 'sparsam' entry first"
            )

    def _load_extra_state(self, extra: Mapping[str, Any]) -> None:
        pass

    def _check_base_state(self, sd: Mapping[str, Any], extra: Mapping[str, Any] | None) -> None:
        """Check a base optimizer state dict against this optimizer's groups and parameters before
        anything is loaded (torch's own load checks only the group sizes, and then fails at the
        next step with a shape or key error)."""
        base_name = type(self.base_optimizer).__name__
        saved_base = extra.get("base") if extra is not None else None
        if saved_base is not None and saved_base != base_name:
            saved_by = extra.get("type") or "SAM" if extra is not None else "SAM"
            raise ValueError(
                f"this state was saved by {saved_by}({saved_base}); this optimizer wraps {base_name}: "
                f"build it around {saved_base} to load it"
            )
        if not isinstance(sd.get("param_groups"), list) or not isinstance(sd.get("state"), Mapping):
            raise TypeError("not an optimizer state dict: it needs a 'state' dict and a 'param_groups' list")
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"the state has {len(groups)} parameter group(s), this optimizer has {len(self.param_groups)}: "
                "it was saved for a different model or a different grouping of its parameters"
            )
        params: dict[Any, Tensor] = {}
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), list):
                raise TypeError(f"parameter group {i} of the state is not a dict with a 'params' list")
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"parameter group {i} of the state has {len(saved['params'])} parameters, this optimizer's has "
                    f"{len(group['params'])}: the state was saved for a different model"
                )
            # Settings the base optimizer reads at every step (flags are filled in by torch for
            # states of older versions; numbers and tuples such as momentum or betas are not).
            missing = sorted(
                k
                for k, v in group.items()
                if k not in saved
                and k not in ("params", "param_names", *_SAM_KEYS)
                and not isinstance(v, (bool, type(None)))
            )
            if missing:
                raise ValueError(
                    f"parameter group {i} of the state has no {', '.join(map(repr, missing))}, which {base_name} "
                    f"needs: the state was saved by a different optimizer than {base_name}"
                )
            params.update(zip(saved["params"], group["params"]))
        for key, st in sd["state"].items():
            p = params.get(key)
            if p is None or not isinstance(st, Mapping):
                continue
            for name, v in st.items():
                if name in _PER_COORDINATE and isinstance(v, Tensor) and v.shape != p.shape:
                    raise ValueError(
                        f"the state's {name} for parameter {key} has shape {tuple(v.shape)}, the parameter has shape "
                        f"{tuple(p.shape)}: the state was saved for a differently shaped model"
                    )

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's full state dict (param groups with the SAM settings, momentum,
        Adam moments, ...) plus a ``"sparsam"`` entry with SAM's own state. The transient copy of
        ``w`` is never saved. Save between steps, not between ``first_step`` and ``second_step``."""
        if self._in_perturbation:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the weights are at w + e "
                "(finish the step, or call restore() to go back to w)"
            )
        sd = self.base_optimizer.state_dict()
        sd["sparsam"] = self._extra_state()
        return sd

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict from [`state_dict`][sparsam.SAM.state_dict] (or a plain state dict of
        the base optimizer).

        All or nothing: the state is checked first (number of groups and parameters, buffer shapes
        against the parameters, the base optimizer it was saved by, SAM vs SSAM, SSAM's norm, form,
        mask source and mask shapes) and a ``ValueError`` names the problem before anything
        changes. If loading still fails (say, inside the mask source), everything is put back as
        it was before the exception propagates.

        The ``"sparsam"`` entry must carry a state version this sparsam reads (1 to
        ``STATE_VERSION``; an older one is migrated with a warning saying what was filled in) and,
        for a state of this class or one it extends, exactly the keys that class writes: a
        missing or renamed key (SSAM's ``steps``, say) is refused naming it and the version.

        Settings outside the parameter groups (SAM's ``eps``, ``ascent`` and ``max_grad_norm``,
        LookSAM's ``k``, ``alpha`` and ``per_tensor``, ESAM's ``gamma``, the schedule and
        ``ascent_fraction``, SSAM's ``implicit_layers``, the mask source's sparsity, period,
        timing, seed and its own settings such as ESAM's ``beta``) follow one rule: the built
        optimizer's are used, and a state saved with a different value is refused with a
        ``ValueError`` naming each setting with the saved and the built value. The parameter
        groups (``lr``, ``rho``, ...) are the saved ones, as for any torch optimizer."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"load_state_dict needs a state dict (a mapping), got {type(state_dict).__name__}")
        if _is_davda54_state(state_dict):
            raise ValueError(
                "this optimizer state dict was saved by davda54/sam's SAM (its entries hold 'old_p', a copy of the "
                "weights, and none of the base optimizer's momentum or Adam moments): there is nothing in it to "
                "resume; load the model's weights from the checkpoint and start the optimizer fresh"
            )
        if self._in_perturbation:
            raise RuntimeError(
                "load_state_dict() between first_step() and second_step(): finish the step or restore() first"
            )
        sd = dict(state_dict)
        extra = sd.pop("sparsam", None)
        if extra is not None:
            extra = self._checked_version(extra)
            self._check_extra_state(extra)
            self._check_settings(extra)
        self._check_base_state(sd, extra)
        before = (self.base_optimizer.state_dict(), self._extra_state())
        try:
            self.base_optimizer.load_state_dict(sd)
            self._relink()  # the base replaced its param_groups and state objects
            self._backup = {}
            if extra is not None:
                self._load_extra_state(extra)
                self._compute = float(extra.get("compute", 0.0))
        except BaseException:
            self.base_optimizer.load_state_dict(before[0])
            self._relink()
            self._load_extra_state(before[1])
            raise

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(base={type(self.base_optimizer).__name__}, groups={len(self.param_groups)}, "
            + ", ".join(f"{k}={self._sam_defaults[k]}" for k in _SAM_KEYS)
            + ")"
        )
