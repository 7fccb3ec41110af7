"""SSAM-F: masks from the diagonal of the empirical Fisher information.

Mi et al., "Make Sharpness-Aware Minimization Stronger: A Sparsified Perturbation Approach",
NeurIPS 2022 (arXiv 2210.05177), Sec. 3.2; TPAMI version arXiv 2306.17504.

    F_i = sum_{j=1..Ns} ( d loss(x_j, y_j) / d w_i )^2        (per-sample gradients, true labels)
    mask = select(F, sparsity, pattern)                          (top-k, structured or N:M)

Normalisation layers (BatchNorm and friends). A per-sample gradient needs a per-sample forward,
and a BatchNorm layer in training mode normalises with the statistics of its batch, which for a
batch of one are the sample's own statistics over its spatial positions (degenerate, output =
bias, for 1x1 maps; an error for ``BatchNorm1d`` on ``(B, C)`` inputs). The authors run Ns batch-1
passes in train mode, which also moves the running statistics Ns times. Here ``bn_stats`` decides:

* ``"running"`` (default): every normalisation layer that tracks running statistics uses them, as
  in eval mode, for the duration of the call. F is then the Fisher of the model you would deploy:
  per-sample gradients are independent of how samples are grouped, every map size works, nothing
  is written. Caveat: right after initialisation the running statistics are still (0, 1), so a
  mask computed then (``timing="before-step"``) sees an un-normalised network and is close to
  random.
* ``"sample"``: norm layers keep the model's mode; those in training mode normalise each sample
  with its own statistics (the authors' batch-1 behaviour, which the papers' presets use) but do
  not update running statistics (the authors' passes also move them Ns times; we do not).

Either way the model's buffers, its train/eval flags (restored on exit, also on error) and every
``.grad`` are left exactly as they were: the computation runs through
``torch.func.functional_call`` on detached copies of the parameters and cloned buffers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .._sharded import Comm, is_sharded, local, shard_like
from .base import LossFn, MaskContext, SeededSource
from .selection import PatternOptions, parse_pattern, resolve_sparsity, select

BN_STATS = ("running", "sample")

# Default memory budget for the per-sample gradients of one chunk (chunk_size=None), and a cap on
# the chunk (larger chunks were slower on a CPU: benchmarks/fisher_cost.py, width-16 ResNet-18).
_CHUNK_BYTES = 512 * 2**20
_CHUNK_MAX = 64

_NOT_SCALAR = "loss_fn must return the mean loss of the batch (a scalar), got shape {}"


def _check_num_samples(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(f"num_samples must be a positive int, got {num_samples!r}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples!r}")
    return num_samples


def _resolve_params(model: nn.Module, params: Any) -> list[tuple[str, str, Tensor]]:
    """(output name, name in model, parameter) for every parameter to score."""
    named = dict(model.named_parameters())
    if params is None:
        return [(n, n, p) for n, p in named.items() if p.requires_grad]
    by_id = {id(p): n for n, p in named.items()}
    out = []
    if isinstance(params, Mapping):
        for key, p in params.items():
            if id(p) not in by_id:
                raise ValueError(f"params[{key!r}] is not a parameter of the model")
            out.append((key, by_id[id(p)], p))
        return out
    for key in params:
        if not isinstance(key, str) or key not in named:
            raise ValueError(f"params names {key!r}, which is not a parameter name of the model")
        out.append((key, key, named[key]))
    return out


def _take_samples(data: Iterable[Any], num_samples: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` samples of ``data`` (batches of (inputs, targets); the last
    batch is split). Stops pulling batches as soon as it has enough."""
    if data is None:
        raise ValueError("data is None; give an iterable of (inputs, targets) batches")
    xs, ys, got = [], [], 0
    for batch in data:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"data must yield (inputs, targets) pairs, got {type(batch).__name__}")
        x, y = batch
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"data must yield tensors, got ({type(x).__name__}, {type(y).__name__})")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs and targets disagree on the batch size: {x.shape[0]} vs {y.shape[0]}")
        take = min(x.shape[0], num_samples - got)
        xs.append(x[:take].to(device))
        ys.append(y[:take].to(device))
        got += take
        if got == num_samples:
            break
    if got < num_samples:
        raise ValueError(f"data ran out after {got} samples; num_samples={num_samples} were requested")
    return torch.cat(xs), torch.cat(ys)


@contextmanager
def _norm_mode(model: nn.Module, bn_stats: str) -> Iterator[None]:
    """Set the normalisation layers' behaviour for the Fisher passes; restore flags on exit."""
    saved: list[tuple[_NormBase, bool, bool]] = []
    try:
        for mod in model.modules():
            if not isinstance(mod, _NormBase) or not mod.track_running_stats or mod.running_mean is None:
                continue
            saved.append((mod, mod.training, mod.track_running_stats))
            if bn_stats == "running":
                mod.training = False
            elif mod.training and isinstance(mod, _BatchNorm):
                # Batch statistics of the (one-sample) batch, no running-statistics update.
                mod.track_running_stats = False
        yield
    finally:
        for mod, training, track in saved:
            mod.training = training
            mod.track_running_stats = track


def fisher_information(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    num_samples: int = 128,
    *,
    chunk_size: int | None = None,
    true_fisher: bool = False,
    generator: torch.Generator | None = None,
    params: Mapping[str, Tensor] | Iterable[str] | None = None,
    bn_stats: str = "running",
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher ``F_i = sum_j (d loss(x_j, y_j) / d w_i)^2`` over ``num_samples``
    per-sample gradients.

    Per-sample gradients are computed ``chunk_size`` samples at a time with
    ``torch.func.vmap(torch.func.grad(...))`` over ``functional_call`` (a few batched passes, not
    ``num_samples`` batch-1 passes). If ``vmap`` cannot handle the model (an op without a batching
    rule, data-dependent control flow, an in-place buffer write), it warns once and falls back to a
    per-sample loop with the same semantics.

    Args:
        model: the network. Its parameters, buffers, ``.grad`` and train/eval flags are not
            changed (see the module docstring for normalisation layers).
        loss_fn: ``loss_fn(outputs, targets)`` returning the MEAN loss of a batch; the per-sample
            loss is ``loss_fn`` on a batch of one.
        data: iterable of ``(inputs, targets)`` batches; the first ``num_samples`` samples are
            used (the last batch is split, no further batch is pulled). Inputs and targets are
            moved to the device of the first scored parameter.
        num_samples: Ns >= 1 (the authors use 128).
        chunk_size: samples per vmapped pass. ``None``: as many as fit 512 MiB of per-sample
            gradients (``chunk_size * n_params * itemsize``), at least 1, at most 64 and at most
            ``num_samples``. Peak memory grows with it (per-sample gradients + activations).
        true_fisher: sample each label from the model's softmax over the last output dimension
            (outputs must be logits of shape ``(batch, classes)``) instead of using the targets.
        generator: random source for ``true_fisher`` (``None``: torch's global RNG). Sampling
            happens on the generator's device.
        params: which parameters to score: a dict ``name -> parameter of the model`` (result keyed
            by these names) or an iterable of parameter names. ``None``: every parameter with
            ``requires_grad``.
        bn_stats: ``"running"`` (default) or ``"sample"``; see the module docstring.

    Returns:
        name -> F (the parameter's shape and device; dtype of the parameter, float32 for
        half/bfloat16 parameters). For parameters sharded by FSDP2 (DTensors), F is a DTensor
        sharded like its parameter: every rank runs rank 0's samples through the sharded model
        one at a time and keeps its shard of F (``docs/scaling.md``).

    Raises:
        ValueError: ``num_samples < 1``, data running out (names how many samples were found), a
            non-finite per-sample loss (names the sample), a non-scalar loss, bad ``bn_stats``.
    """
    n_total = _check_num_samples(num_samples)
    if bn_stats not in BN_STATS:
        raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    scored = _resolve_params(model, params)
    if not scored:
        return {}
    if any(is_sharded(p) for _, _, p in scored):
        return _sharded_fisher(model, loss_fn, data, n_total, scored, chunk_size, true_fisher, generator, bn_stats)
    device = scored[0][2].device
    inputs, targets = _take_samples(data, n_total, device)

    model_names = {mn for _, mn, _ in scored}
    theta = {mn: p.detach() for _, mn, p in scored}
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in model_names}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    acc_dtype = {mn: (torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for _, mn, p in scored}
    acc = {mn: torch.zeros(p.shape, dtype=acc_dtype[mn], device=p.device) for _, mn, p in scored}

    if chunk_size is None:
        per_sample = sum(p.numel() * p.element_size() for _, _, p in scored)
        chunk_size = max(1, min(n_total, _CHUNK_MAX, _CHUNK_BYTES // max(per_sample, 1)))

    def forward(th: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, (th, frozen, buffers), (x,))

    def sample_loss(th: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        loss = loss_fn(forward(th, x.unsqueeze(0)), y.unsqueeze(0))
        if loss.dim() != 0:
            raise ValueError(_NOT_SCALAR.format(tuple(loss.shape)))
        return loss, loss.detach()

    per_sample_grads = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0), randomness="different")
    per_sample_outputs = vmap(
        lambda th, x: forward(th, x.unsqueeze(0)).squeeze(0), in_dims=(None, 0), randomness="different"
    )

    use_vmap = True

    def fallback(err: Exception, x: Tensor) -> None:
        nonlocal use_vmap
        # Is it vmap, or does the model fail on one sample without vmap too? Then the loop would
        # only fail again: report the model's own error, not a misleading fallback warning.
        try:
            with torch.no_grad():
                forward(theta, x[:1])
        except NotImplementedError as plain:
            raise NotImplementedError(
                f"fisher_information: {type(model).__name__} fails on one sample without vmap too ({plain}). The "
                "Fisher mask computes loss_fn(model(inputs), targets) one sample at a time, so the model needs a "
                "forward(inputs) (a LightningModule too: define forward() and call it from training_step)"
            ) from plain
        use_vmap = False
        warnings.warn(
            f"fisher_information: torch.func.vmap cannot run this model ({type(err).__name__}: {err}); "
            "falling back to a per-sample loop (same result, slower)",
            RuntimeWarning,
            stacklevel=3,
        )

    def loop_grads(x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        grads: dict[str, list[Tensor]] = {mn: [] for mn in theta}
        losses = []
        for j in range(x.shape[0]):
            th = {mn: t.clone().requires_grad_(True) for mn, t in theta.items()}
            loss = loss_fn(forward(th, x[j : j + 1]), y[j : j + 1])
            if loss.dim() != 0:
                raise ValueError(_NOT_SCALAR.format(tuple(loss.shape)))
            gs = torch.autograd.grad(loss, list(th.values()), allow_unused=True)
            for mn, g in zip(th, gs):
                grads[mn].append(torch.zeros_like(theta[mn]) if g is None else g)
            losses.append(loss.detach())
        return {mn: torch.stack(v) for mn, v in grads.items()}, torch.stack(losses)

    def chunk_labels(x: Tensor) -> Tensor:
        nonlocal use_vmap
        with torch.no_grad():
            out = None
            if use_vmap:
                try:
                    out = per_sample_outputs(theta, x)
                except (RuntimeError, NotImplementedError) as err:
                    fallback(err, x)
            if out is None:
                out = torch.cat([forward(theta, x[j : j + 1]) for j in range(x.shape[0])])
        return _sampled_labels(out, generator, x.device)

    with _norm_mode(model, bn_stats):
        for start in range(0, n_total, chunk_size):
            x = inputs[start : start + chunk_size]
            y = chunk_labels(x) if true_fisher else targets[start : start + chunk_size]
            gs = None
            if use_vmap:
                try:
                    gs, losses = per_sample_grads(theta, x, y)
                except (RuntimeError, NotImplementedError) as err:
                    fallback(err, x)
            if gs is None:
                gs, losses = loop_grads(x, y)
            finite = torch.isfinite(losses)
            if not bool(finite.all()):  # host sync, once per chunk
                j = int(torch.nonzero(~finite)[0])
                raise ValueError(
                    f"loss is not finite ({float(losses[j])}) for sample {start + j} while computing the Fisher"
                )
            for mn, g in gs.items():
                acc[mn].add_(g.to(acc_dtype[mn]).pow(2).sum(0))
    return {out_name: acc[mn] for out_name, mn, _ in scored}


def _sharded_fisher(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    n_total: int,
    scored: list[tuple[str, str, Tensor]],
    chunk_size: int | None,
    true_fisher: bool,
    generator: torch.Generator | None,
    bn_stats: str,
) -> dict[str, Tensor]:
    """The Fisher of parameters sharded by FSDP2, per shard (DTensor scores sharded like them).

    Every rank runs the same ``n_total`` samples: rank 0's, broadcast to the others (one object
    broadcast), each through the sharded model's own forward and backward on a batch of one, with
    rank 0's buffers (running statistics; each rank's own are restored afterwards). FSDP
    averages the ranks' gradients in its reduce-scatter; as they are gradients of the same sample
    at the same weights, each rank's ``p.grad`` is then its shard of that sample's gradient, whose
    square is added to the rank's part of ``F``. Per-sample passes are FSDP collectives, so every
    rank makes the same number of them. The ``.grad`` of every parameter is restored afterwards.
    """
    plain = [out for out, _, p in scored if not is_sharded(p)]
    if plain:
        raise ValueError(
            f"fisher_information: parameters {plain[:3]} are plain tensors next to sharded (FSDP2) ones; "
            "shard the modules holding them too"
        )
    comm = Comm.of(scored[0][2])
    device = local(scored[0][2]).device
    mine = _take_samples(data, n_total, device)
    inputs, targets = comm.broadcast_object((mine[0].cpu(), mine[1].cpu()))  # rank 0's samples everywhere
    inputs, targets = inputs.to(device), targets.to(device)
    acc_dtype = {mn: (torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype) for _, mn, p in scored}
    acc = {mn: torch.zeros(local(p).shape, dtype=acc_dtype[mn], device=device) for _, mn, p in scored}
    if chunk_size is None:  # as one process would chunk (only the true-Fisher labels depend on it)
        per_sample = sum(p.numel() * p.element_size() for _, _, p in scored)
        chunk_size = max(1, min(n_total, _CHUNK_MAX, _CHUNK_BYTES // max(per_sample, 1)))
    params = list(model.parameters())
    saved = [p.grad for p in params]
    # Buffers (BatchNorm running statistics) are per rank under FSDP2: every rank computes with
    # rank 0's for the duration of the call, so all ranks take the gradient of the same function.
    buffers = [b for b in model.buffers() if not is_sharded(b)]
    saved_buffers = [b.detach().clone() for b in buffers]

    def labels(x: Tensor) -> Tensor:
        with torch.no_grad():
            out = torch.cat([model(x[j : j + 1]) for j in range(x.shape[0])])
        return _sampled_labels(out, generator, x.device)

    try:
        for b in buffers:
            comm.broadcast_(b)
        for p in params:
            p.grad = None
        with _norm_mode(model, bn_stats), torch.enable_grad():
            for start in range(0, n_total, chunk_size):
                x = inputs[start : start + chunk_size]
                y = labels(x) if true_fisher else targets[start : start + chunk_size]
                for j in range(x.shape[0]):
                    loss = loss_fn(model(x[j : j + 1]), y[j : j + 1])
                    if loss.dim() != 0:
                        raise ValueError(_NOT_SCALAR.format(tuple(loss.shape)))
                    if not bool(torch.isfinite(loss.detach())):  # the same sample on every rank: all raise
                        raise ValueError(
                            f"loss is not finite ({float(loss)}) for sample {start + j} while computing the Fisher"
                        )
                    loss.backward()
                    for _, mn, sp in scored:
                        if sp.grad is not None:
                            acc[mn].add_(local(sp.grad).to(acc_dtype[mn]).square())
                    for p in params:
                        p.grad = None
    finally:
        for p, g in zip(params, saved):
            p.grad = g
        with torch.no_grad():
            for b, v in zip(buffers, saved_buffers):
                b.copy_(v)
    return {out: shard_like(acc[mn], p) for out, mn, p in scored}


class FisherMask(PatternOptions, SeededSource):
    """SSAM-F: perturb the coordinates with the largest diagonal empirical Fisher information.

    ``init`` and every ``update`` compute [`fisher_information`][sparsam.masks.fisher_information] over
    ``num_samples`` samples drawn from ``iter(ctx.data)`` with ``ctx.model`` and ``ctx.loss_fn`` (pass
    ``model=``, ``loss_fn=``, ``data=`` to the optimizer), then [`select`][sparsam.masks.select] the
    mask.

    When (``timing``): with ``"before-step"`` (default) the first mask is computed before step 0
    from the initial weights and refreshed at the start of steps ``P, 2P, ...``. With
    ``"after-step"`` (the authors' release) ``init`` returns all-False masks, so step 0 is one
    unperturbed base-optimizer step; the Fisher mask is computed at the start of step 1 from the
    weights step 0 produced (the authors compute it right after step 0: epoch 0, batch 0) and
    refreshed at the start of steps ``P + 1, 2P + 1, ...``. Only step 0 is unperturbed.

    To reproduce the authors' masks use ``bn_stats="sample"``, ``timing="after-step"`` and, for
    the structured pattern, ``fill="overshoot"`` (``docs/differences.md``).

    Args:
        sparsity: fraction NOT perturbed, in ``[0, 1)``; ``None`` with an N:M pattern (implied).
        num_samples: Ns (the authors: 128).
        pattern, n, m, granularity, budget, one_d, fill: as in [`select`][sparsam.masks.select].
        true_fisher, chunk_size, bn_stats: as in
            [`fisher_information`][sparsam.masks.fisher_information].
        update_every / update_every_epochs + steps_per_epoch: refresh period (the authors'
            argparse default is 5 epochs, their README examples use 1); ``None``: computed once.
        timing: ``"before-step"`` (default) or ``"after-step"`` (the authors'), see above.
        seed: seeds this source's generator (used by ``true_fisher``); saved in ``state_dict``.
    """

    needs_data = True

    def __init__(
        self,
        sparsity: float | None = None,
        num_samples: int = 128,
        *,
        pattern: str = "unstructured",
        n: int | None = None,
        m: int | None = None,
        granularity: str = "tensor",
        budget: str = "global",
        one_d: str | None = None,
        fill: str = "first-fit",
        true_fisher: bool = False,
        chunk_size: int | None = None,
        bn_stats: str = "running",
        update_every: int | None = None,
        update_every_epochs: int | None = None,
        steps_per_epoch: int | None = None,
        timing: str = "before-step",
        seed: int = 0,
    ) -> None:
        self.pattern, self.n, self.m = parse_pattern(pattern, n, m)
        super().__init__(
            resolve_sparsity(sparsity, self.pattern, self.n, self.m),
            update_every=update_every,
            update_every_epochs=update_every_epochs,
            steps_per_epoch=steps_per_epoch,
            timing=timing,
        )
        self.num_samples = _check_num_samples(num_samples)
        if bn_stats not in BN_STATS:
            raise ValueError(f"bn_stats must be one of {BN_STATS}, got {bn_stats!r}")
        self.granularity, self.budget, self.one_d, self.fill = granularity, budget, one_d, fill
        self.true_fisher, self.chunk_size, self.bn_stats = bool(true_fisher), chunk_size, bn_stats
        self._seed(seed)
        # Fail early on bad selection options (select validates them).
        select(
            {},
            self.sparsity,
            self.pattern,
            n=self.n,
            m=self.m,
            granularity=granularity,
            budget=budget,
            one_d=one_d,
            fill=fill,
        )

    def scores(self, ctx: MaskContext) -> dict[str, Tensor]:
        """The Fisher information of ``ctx.params`` (keyed by their names in ``ctx``)."""
        missing = [k for k in ("model", "loss_fn", "data") if getattr(ctx, k) is None]
        if missing:
            raise ValueError(f"FisherMask needs {', '.join(missing)}: pass model=, loss_fn= and data= to the optimizer")
        return fisher_information(
            cast(nn.Module, ctx.model),  # not None: checked above
            cast(Callable[[Tensor, Tensor], Tensor], ctx.loss_fn),
            cast(Iterable[Any], ctx.data),
            self.num_samples,
            chunk_size=self.chunk_size,
            true_fisher=self.true_fisher,
            generator=self.generator,
            params=ctx.params,
            bn_stats=self.bn_stats,
        )

    def _compute(self, ctx: MaskContext) -> dict[str, Tensor]:
        return self._select(self.scores(ctx))

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        if self.timing == "after-step":  # the authors' all-zero start: step 0 is unperturbed
            return {
                n: shard_like(torch.zeros(local(p).shape, dtype=torch.bool, device=local(p).device), p)
                if is_sharded(p)  # FSDP2: this rank's rows only
                else torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                for n, p in ctx.params.items()
            }
        return self._compute(ctx)

    def update(self, ctx: MaskContext) -> dict[str, Tensor] | None:
        return self._compute(ctx)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            **self._pattern_settings(),
            "num_samples": self.num_samples,
            "true_fisher": self.true_fisher,
            "bn_stats": self.bn_stats,
        }

    def extra_repr(self) -> str:
        pat = self._pattern_name()
        return (
            f"{super().extra_repr()}, num_samples={self.num_samples}, pattern={pat!r}, "
            f"true_fisher={self.true_fisher}, bn_stats={self.bn_stats!r}"
            + (f", fill={self.fill!r}" if self.pattern == "structured" else "")
        )


def _sampled_labels(out: Tensor, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """The true Fisher's labels: one class per sample drawn from the model's softmax over ``out``."""
    if out.dim() != 2:
        raise ValueError(f"true_fisher needs logits of shape (batch, classes), got outputs of shape {tuple(out.shape)}")
    sample_device = generator.device if generator is not None else out.device
    probs = torch.softmax(out.detach().to(sample_device, torch.float64), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1).to(device)


__all__ = ["FisherMask", "fisher_information"]
