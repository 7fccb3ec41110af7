"""The one selection helper every mask source shares: scores in, boolean masks out.

[`select`][sparsam.masks.select] turns per-coordinate scores (Fisher information, random numbers,
``|g|``, ...) into masks under one of three patterns (TPAMI version of SSAM, arXiv 2306.17504):

``unstructured``
    Top-k over coordinates. ``budget="global"`` (the authors'): one ranking over every ranked
    tensor, ``k = round((1 - s) * N)``. ``budget="layer"``: every tensor keeps
    ``round((1 - s) * N_i)`` of its own coordinates.
``structured``
    Whole units are kept or dropped. ``granularity="tensor"`` (the authors'): a unit is a whole
    parameter tensor, ranked by its mean score. ``granularity="channel"``: a unit is an output
    channel, i.e. a row of the weight viewed as ``(out, in)``, ranked by the row's mean score.
    ``fill`` says how the global budget is met: ``"overshoot"`` (the authors' rule: take units by
    decreasing mean until the budget is reached, the unit that crosses it included) or
    ``"first-fit"`` (ours: take a unit only when it still fits, never exceeding the budget).
``N:M``
    In every group of ``M`` consecutive weights along the input dimension of the weight viewed as
    ``(out, in)`` (a conv weight ``(C_out, C_in, kh, kw)`` as ``(C_out, C_in*kh*kw)``), keep the
    ``N`` with the highest scores: the layout of 2:4 sparse tensor cores and of
    ``torch.sparse.to_sparse_semi_structured``.

Conventions (every pattern):

* **Rounding.** A budget is ``keep_count(N, s) = round((1 - s) * N)``, computed in floating point
  with Python's ``round`` (halves go to the even integer: ``round(2.5) == 2``).
* **Ties** are broken by position: the lower flat index wins. Flat indices run over the tensors in
  the order of the ``scores`` dict, row-major inside each tensor (units: tensor order, then row).
* **NaN scores** raise ``ValueError`` (they have no order). ``+-inf`` is ranked like any number.
* **1-D tensors** (``dim() <= 1``: biases, norm scales) follow ``one_d``: ``"always"`` (kept
  whole, outside the budget: the authors' N:M behaviour and our N:M default), ``"never"``
  (dropped, outside the budget) or ``"rank"`` (ranked like any other tensor: the default of the
  unstructured and structured patterns). Under ``"always"``/``"never"`` the budget counts only
  the ranked tensors, so with ``"always"`` the overall density is a little above ``1 - s``.
* Masks are ``torch.bool`` tensors (one byte per coordinate) on each score tensor's device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import _sharded
from .base import check_sparsity

PATTERNS = ("unstructured", "structured", "nm")
GRANULARITIES = ("tensor", "channel")
BUDGETS = ("global", "layer")
FILLS = ("first-fit", "overshoot")
ONE_D_POLICIES = ("always", "never", "rank")

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def keep_count(numel: int, sparsity: float) -> int:
    """Number of coordinates kept out of ``numel`` at ``sparsity``: ``round((1 - sparsity) * numel)``.

    Python's ``round`` (ties to even), computed in floating point. Every budget in
    ``sparsam.masks`` goes through this function.
    """
    return round((1.0 - float(sparsity)) * int(numel))


def parse_pattern(pattern: str, n: int | None = None, m: int | None = None) -> tuple[str, int | None, int | None]:
    """Normalise a pattern name: ``"unstructured"``, ``"structured"``, ``"nm"``/``"n:m"`` (with
    ``n`` and ``m``) or a literal ``"2:4"``. Returns ``(pattern, n, m)``; raises on bad values."""
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string, got {pattern!r}")
    p = pattern.strip().lower()
    match = _NM_RE.match(p)
    if match is not None:
        pn, pm = int(match.group(1)), int(match.group(2))
        if (n is not None and n != pn) or (m is not None and m != pm):
            raise ValueError(f"pattern {pattern!r} disagrees with n={n!r}, m={m!r}")
        n, m, p = pn, pm, "nm"
    elif p in ("n:m", "nm"):
        p = "nm"
    if p not in PATTERNS:
        raise ValueError(
            f"unknown pattern {pattern!r}; use 'unstructured', 'structured', 'nm' (with n, m) or 'N:M' such as '2:4'"
        )
    if p == "nm":
        n, m = _nm_ints(n, m)
        if m < 1:
            raise ValueError(f"N:M needs m >= 1, got m={m!r}")
        if n < 1:
            raise ValueError(f"N:M needs n >= 1, got n={n!r}")
        if n > m:
            raise ValueError(f"N:M needs n <= m, got n={n!r} > m={m!r}")
    elif n is not None or m is not None:
        raise ValueError(f"n and m only apply to the N:M pattern, got pattern={pattern!r} with n={n!r}, m={m!r}")
    return p, n, m


def _nm_ints(n: int | None, m: int | None) -> tuple[int, int]:
    """``(n, m)`` of the N:M pattern, each checked to be an int."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the N:M pattern needs n as an int, got n={n!r}")
    if isinstance(m, bool) or not isinstance(m, int):
        raise TypeError(f"the N:M pattern needs m as an int, got m={m!r}")
    return n, m


def resolve_sparsity(sparsity: float | None, pattern: str, n: int | None, m: int | None) -> float:
    """The sparsity a pattern implies. For N:M it is ``1 - n/m``; a given ``sparsity`` must agree."""
    if pattern == "nm":
        n, m = _nm_ints(n, m)
        implied = 1.0 - n / m
        if sparsity is not None:
            s = check_sparsity(sparsity, allow_one=False)
            if abs(s - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={sparsity!r} disagrees with the {n}:{m} pattern (which implies {implied!r}); "
                    "pass sparsity=None"
                )
        return implied
    if sparsity is None:
        raise ValueError(f"pattern {pattern!r} needs a sparsity in [0, 1), got None")
    return check_sparsity(sparsity, allow_one=False)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def top_positions(values: Tensor, k: int, *, largest: bool = True) -> Tensor:
    """Boolean mask (same shape as the 1-D ``values``) of its ``k`` largest (or smallest) entries.

    Ties at the threshold go to the lower positions. ``O(n)`` (``kthvalue``), no full sort.
    """
    n = values.numel()
    k = int(k)
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    keep = torch.zeros(n, dtype=torch.bool, device=values.device)
    if k == 0:
        return keep
    if k == n:
        return keep.fill_(True)
    v = values if values.is_floating_point() else values.double()
    if not largest:
        v = -v
    # k-th largest = (n - k + 1)-th smallest.
    thr = torch.kthvalue(v, n - k + 1).values
    keep = v > thr
    need = k - int(keep.sum())  # host sync: selection is not part of an optimizer step
    if need > 0:
        ties = torch.nonzero(v == thr).flatten()[:need]
        keep[ties] = True
    return keep


def _common_device(tensors: list[Tensor]) -> torch.device:
    devices = {t.device for t in tensors}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def _flat_scores(tensors: list[Tensor], device: torch.device) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float64, device=device)
    dtypes = {t.dtype for t in tensors}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float64
    if not dtype.is_floating_point:
        dtype = torch.float64
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def _check_scores(scores: Mapping[str, Tensor]) -> None:
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a dict name -> Tensor, got {type(scores).__name__}")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{name!r}] must be a Tensor, got {type(s).__name__}")
        if s.is_floating_point() and bool(torch.isnan(s).any()):
            raise ValueError(f"scores[{name!r}] contains NaN; scores must be ordered numbers")
        if s.is_complex():
            raise TypeError(f"scores[{name!r}] is complex; scores must be real")


def _as_matrix(t: Tensor) -> Tensor:
    """View a tensor as (out, in): rows are output channels. 1-D and 0-D as one row."""
    if t.dim() >= 2:
        return t.reshape(t.shape[0], t[0].numel() if t.shape[0] else 0)
    return t.reshape(1, t.numel())


def _unstructured(scores: dict[str, Tensor], sparsity: float, budget: str) -> dict[str, Tensor]:
    names = list(scores)
    if budget == "layer":
        out = {}
        for name in names:
            s = scores[name]
            flat = _flat_scores([s], s.device)
            out[name] = top_positions(flat, keep_count(flat.numel(), sparsity)).reshape(s.shape)
        return out
    tensors = [scores[n] for n in names]
    device = _common_device(tensors)
    flat = _flat_scores(tensors, device)
    keep = top_positions(flat, keep_count(flat.numel(), sparsity))
    out, i = {}, 0
    for name, s in zip(names, tensors):
        out[name] = keep[i : i + s.numel()].reshape(s.shape).to(s.device)
        i += s.numel()
    return out


def _greedy_units(means: list[float], sizes: list[int], budget: int) -> list[bool]:
    """First-fit greedy: walk units by decreasing mean (ties: earlier unit first) and take a unit
    when it fits in what is left of the budget. Never exceeds the budget; what is left over is
    smaller than every skipped unit."""
    order = sorted(range(len(means)), key=lambda j: (-means[j], j))
    taken = [False] * len(means)
    left = budget
    for j in order:
        if sizes[j] <= left:
            taken[j] = True
            left -= sizes[j]
    return taken


def _overshoot_units(means: list[float], sizes: list[int], budget: int) -> list[bool]:
    """The authors' rule (TPAMI release, ``solver/sam.py``, pattern "structured"): walk units by
    decreasing mean (ties: earlier unit first) and take each while fewer than ``budget``
    coordinates are taken; the unit that reaches or crosses the budget is taken, then the walk
    stops. Keeps at least ``budget`` coordinates (unless all units together are fewer) and
    exceeds it by less than the last unit taken."""
    order = sorted(range(len(means)), key=lambda j: (-means[j], j))
    taken = [False] * len(means)
    kept = 0
    for j in order:
        if kept >= budget:
            break
        taken[j] = True
        kept += sizes[j]
    return taken


def _unit_means(t: Tensor, granularity: str) -> Tensor:
    t = t.detach()
    t = t if t.is_floating_point() else t.double()
    if granularity == "tensor":
        return t.double().mean().reshape(1) if t.numel() else torch.full((1,), float("-inf"), dtype=torch.float64)
    mat = _as_matrix(t) if t.dim() >= 2 else t.reshape(-1, 1)
    if mat.shape[1] == 0:
        return torch.full((mat.shape[0],), float("-inf"), dtype=torch.float64, device=t.device)
    return mat.double().mean(dim=1)


def _structured(
    scores: dict[str, Tensor], sparsity: float, granularity: str, budget: str, fill: str = "first-fit"
) -> dict[str, Tensor]:
    names = list(scores)
    if granularity == "tensor" and budget == "layer":
        raise ValueError("budget='layer' has no meaning with granularity='tensor' (a tensor is one unit); use 'global'")
    means = {name: _unit_means(scores[name], granularity) for name in names}
    rows = _structured_units(means, {n: scores[n].numel() for n in names}, sparsity, granularity, budget, fill)
    out: dict[str, Tensor] = {}
    for name in names:
        s = scores[name]
        if granularity == "tensor":
            out[name] = torch.full(s.shape, bool(rows[name][0]), dtype=torch.bool, device=s.device)
        else:
            out[name] = _rows_to_mask(rows[name], s)
    return out


def _structured_units(
    means: dict[str, Tensor], numels: dict[str, int], sparsity: float, granularity: str, budget: str, fill: str
) -> dict[str, Tensor]:
    """Which units of each tensor are kept, from the units' mean scores (one bool per unit, CPU)."""
    names = list(means)
    if granularity == "channel" and budget == "layer":
        return {name: top_positions(means[name].cpu(), keep_count(means[name].numel(), sparsity)) for name in names}
    # Global budget: units of every tensor compete for k = round((1 - s) N) coordinates.
    unit_means: list[float] = []
    unit_sizes: list[int] = []
    spans: list[tuple[int, int]] = []
    for name in names:
        unit = means[name].cpu().tolist()  # host sync: a few thousand numbers
        n_units = len(unit)
        size = numels[name] if granularity == "tensor" else (numels[name] // max(n_units, 1))
        spans.append((len(unit_means), n_units))
        unit_means.extend(unit)
        unit_sizes.extend([size] * n_units)
    walk = _overshoot_units if fill == "overshoot" else _greedy_units
    taken = walk(unit_means, unit_sizes, keep_count(sum(numels.values()), sparsity))
    return {
        name: torch.tensor(taken[start : start + count], dtype=torch.bool) for name, (start, count) in zip(names, spans)
    }


def _rows_to_mask(rows: Tensor, like: Tensor) -> Tensor:
    rows = rows.to(like.device)
    if like.dim() >= 2:
        mat = rows.reshape(-1, 1).expand(like.shape[0], like[0].numel() if like.shape[0] else 0)
        return mat.reshape(like.shape).clone()
    return rows.reshape(like.shape).clone()


def nm_mask(score: Tensor, n: int, m: int) -> Tensor:
    """N:M mask of one tensor viewed as (out, in): in every group of ``m`` consecutive entries of a
    row keep the ``n`` with the highest scores (ties: lower index).

    When ``in`` is not a multiple of ``m`` the last group of each row is padded with ``-inf``
    scores: its ``g = in mod m`` real entries keep ``min(n, g)`` of them (the padding is what a
    2:4 kernel would see as zeros, so the result stays a valid N:M layout once padded).
    """
    mat = _as_matrix(score.detach())
    mat = mat if mat.is_floating_point() else mat.double()
    rows, cols = mat.shape
    if mat.numel() == 0:
        return torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    groups = -(-cols // m)
    pad = groups * m - cols
    if pad:
        mat = torch.cat([mat, mat.new_full((rows, pad), float("-inf"))], dim=1)
    grouped = mat.reshape(rows, groups, m)
    # Stable descending sort: among equal scores the lower index comes first (padding is last).
    order = torch.sort(grouped, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros(grouped.shape, dtype=torch.bool, device=mat.device)
    keep.scatter_(-1, order[..., :n], True)
    keep = keep.reshape(rows, groups * m)[:, :cols]
    return keep.reshape(score.shape).clone()


def select(
    scores: Mapping[str, Tensor],
    sparsity: float | None,
    pattern: str = "unstructured",
    *,
    n: int | None = None,
    m: int | None = None,
    granularity: str = "tensor",
    budget: str = "global",
    one_d: str | None = None,
    fill: str = "first-fit",
) -> dict[str, Tensor]:
    """Turn scores into boolean masks: higher score = perturbed first.

    Args:
        scores: name -> score tensor (any real dtype, any device). The result has the same keys,
            shapes and devices.
        sparsity: fraction of coordinates NOT kept, in ``[0, 1)``. For N:M it is implied
            (``1 - n/m``): pass ``None`` or the matching value.
        pattern: ``"unstructured"``, ``"structured"``, ``"nm"`` (with ``n``, ``m``) or ``"N:M"``
            such as ``"2:4"``.
        n, m: keep ``n`` of every ``m`` consecutive weights (N:M only).
        granularity: structured units: ``"tensor"`` (whole tensors, the authors') or
            ``"channel"`` (rows of the weight viewed as ``(out, in)``; a 1-D tensor's units are
            its entries).
        budget: ``"global"`` (one budget over all ranked tensors, the authors') or ``"layer"``
            (each tensor keeps ``round((1 - s) N_i)`` coordinates, or rows for channels).
            Ignored by N:M (its budget is per group).
        one_d: 1-D policy, ``"always"``, ``"never"`` or ``"rank"``; ``None`` picks ``"always"``
            for N:M and ``"rank"`` otherwise.
        fill: how a structured global budget is met: ``"first-fit"`` (default, never exceeds
            it) or ``"overshoot"`` (the authors' rule). Ignored by the other patterns.

    Budgets: unstructured keeps exactly ``round((1 - s) N)`` coordinates (global) or
    ``round((1 - s) N_i)`` per tensor (layer). Structured with a global budget ``k =
    round((1 - s) N)``: units are visited by decreasing mean score (ties: earlier tensor, lower row).
    ``fill="first-fit"``: a unit is taken when it fits in what is left of ``k``, so at most ``k``
    coordinates are kept, and the shortfall is smaller than every unit that was skipped.
    ``fill="overshoot"`` (the authors' rule): units are taken while fewer than ``k`` coordinates
    are kept, so the unit that crosses ``k`` is kept too and the walk then stops (on a CIFAR
    ResNet-18 at ``s = 0.5`` the density can end far above 0.5). N:M keeps
    ``min(n, g)`` of each group of ``g <= m`` real entries. Ties: lower flat index first.

    Sharded scores: when the scores are DTensors sharded as FSDP2 shards parameters
    (``Shard(0)`` on a 1-D device mesh), every rank passes its DTensors and gets DTensor masks
    sharded the same way, each rank's part of exactly the masks one process would choose from the
    full scores (a distributed threshold, no gather of scores; ``docs/scaling.md``). Supported:
    unstructured, structured with ``granularity="channel"``, N:M.

    Raises:
        ValueError: sparsity outside ``[0, 1)``, unknown pattern/granularity/budget/one_d/fill,
            ``n > m``, ``n < 1``, ``m < 1``, NaN scores; for sharded scores also plain and
            sharded scores mixed, a layout other than FSDP2's, structured with
            ``granularity="tensor"`` and N:M groups of a 1-D tensor crossing a shard boundary.
        TypeError: scores not a dict of tensors, non-int ``n``/``m``.
    """
    p, n, m = parse_pattern(pattern, n, m)
    s = resolve_sparsity(sparsity, p, n, m)
    _check_choice("granularity", granularity, GRANULARITIES)
    _check_choice("budget", budget, BUDGETS)
    _check_choice("fill", fill, FILLS)
    if one_d is None:
        one_d = "always" if p == "nm" else "rank"
    _check_choice("one_d", one_d, ONE_D_POLICIES)
    if isinstance(scores, Mapping) and any(map(_sharded.is_sharded, scores.values())):
        return _select_sharded(scores, s, p, n, m, granularity, budget, one_d, fill)
    _check_scores(scores)

    fixed: dict[str, Tensor] = {}
    ranked: dict[str, Tensor] = {}
    for name, t in scores.items():
        if t.dim() <= 1 and one_d != "rank":
            fixed[name] = torch.full(t.shape, one_d == "always", dtype=torch.bool, device=t.device)
        else:
            ranked[name] = t

    if p == "unstructured":
        chosen = _unstructured(ranked, s, budget)
    elif p == "structured":
        chosen = _structured(ranked, s, granularity, budget, fill)
    else:
        n, m = _nm_ints(n, m)
        chosen = {name: nm_mask(t, n, m) for name, t in ranked.items()}
    return {name: (fixed[name] if name in fixed else chosen[name]) for name in scores}


def _select_sharded(
    scores: Mapping[str, Tensor],
    sparsity: float,
    pattern: str,
    n: int | None,
    m: int | None,
    granularity: str,
    budget: str,
    one_d: str,
    fill: str,
) -> dict[str, Tensor]:
    """[`select`][sparsam.masks.select] on scores sharded as FSDP2 shards parameters (DTensors,
    ``Shard(0)`` on a 1-D mesh): each rank gets its part of the masks a single process would
    choose from the full scores, as DTensors sharded like the scores. See ``docs/scaling.md``."""
    first = None
    for name, t in scores.items():
        if not _sharded.is_sharded(t):
            raise ValueError(
                f"scores[{name!r}] is a plain tensor next to sharded (DTensor) scores: give every score sharded "
                "(FSDP2) or none"
            )
        _sharded.check_layout(t, f"scores[{name!r}]")
        if first is None:
            first = t
        elif t.device_mesh != first.device_mesh:
            raise ValueError(f"scores[{name!r}] is on another device mesh than the first sharded score")
        if t.is_complex():
            raise TypeError(f"scores[{name!r}] is complex; scores must be real")
    if first is None:
        return {}
    comm = _sharded.Comm.of(first)
    parts = {name: _sharded.local(t) for name, t in scores.items()}
    # NaN on any rank's part: every rank raises (a rank alone would leave the others waiting).
    nan = torch.tensor(
        [bool(t.is_floating_point() and torch.isnan(t).any()) for t in parts.values()], dtype=torch.int64
    )
    nan = comm.all_reduce_sum(nan)
    for name, flag in zip(parts, nan.tolist()):
        if flag:
            raise ValueError(f"scores[{name!r}] contains NaN; scores must be ordered numbers")
    fixed: dict[str, Tensor] = {}
    ranked: list[str] = []
    for name, t in scores.items():
        if t.dim() <= 1 and one_d != "rank":
            fixed[name] = torch.full(parts[name].shape, one_d == "always", dtype=torch.bool, device=parts[name].device)
        else:
            ranked.append(name)
    chosen: dict[str, Tensor] = {}
    if pattern == "unstructured":
        if budget == "global":
            groups, ks = [0] * len(ranked), [keep_count(sum(scores[x].numel() for x in ranked), sparsity)]
        else:
            groups, ks = list(range(len(ranked))), [keep_count(scores[x].numel(), sparsity) for x in ranked]
        keeps = _sharded.sharded_top([parts[x].reshape(-1) for x in ranked], groups, ks, comm)
        chosen = {x: k.reshape(parts[x].shape) for x, k in zip(ranked, keeps)}
    elif pattern == "structured":
        if granularity == "tensor":
            raise ValueError(
                "pattern='structured' with granularity='tensor' is not supported on sharded (FSDP2) scores: a "
                "tensor's mean score would be summed over the shards, whose rounding differs from one process's, "
                "so the chosen tensors could differ; use granularity='channel' (rows lie whole on one rank)"
            )
        local_means = [_unit_means(parts[x], "channel") for x in ranked]
        full_means, offsets = _sharded.gather_vectors(local_means, comm)
        rows = _structured_units(
            dict(zip(ranked, full_means)),
            {x: scores[x].numel() for x in ranked},
            sparsity,
            "channel",
            budget,
            fill,
        )
        for x, off, mine in zip(ranked, offsets, local_means):
            chosen[x] = _rows_to_mask(rows[x][off : off + mine.numel()], parts[x])
    else:
        n, m = _nm_ints(n, m)
        for x in ranked:
            t = scores[x]
            if t.dim() <= 1:  # one row over the whole vector: its groups must not cross a shard boundary
                starts = _sharded.chunk_starts(t.numel(), comm.world)
                if any(st % m for st in starts):
                    raise ValueError(
                        f"the {n}:{m} pattern on the sharded 1-D tensor {x!r} of length {t.numel()}: its shards start "
                        f"at {starts}, so groups of {m} would cross a shard boundary; use one_d='always' or 'never' "
                        f"(the N:M default), or a world size whose shards of it are multiples of {m}"
                    )
            chosen[x] = nm_mask(parts[x], n, m)  # rows (dim 0) lie whole on one rank
    return {name: _sharded.shard_like(fixed[name] if name in fixed else chosen[name], scores[name]) for name in scores}


class PatternOptions:
    """Mixin of the score-based mask sources (Fisher, random): the pattern settings they keep
    (``sparsity``, ``pattern``, ``n``, ``m``, ``granularity``, ``budget``, ``one_d``, ``fill``) and the one
    call of [`select`][sparsam.masks.select] that turns their scores into masks."""

    sparsity: float
    pattern: str
    n: int | None
    m: int | None
    granularity: str
    budget: str
    one_d: str | None
    fill: str = "first-fit"

    def _select(self, scores: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return select(
            scores,
            self.sparsity,
            self.pattern,
            n=self.n,
            m=self.m,
            granularity=self.granularity,
            budget=self.budget,
            one_d=self.one_d,
            fill=self.fill,
        )

    def _pattern_settings(self) -> dict[str, Any]:
        """The pattern settings, for the source's ``settings()`` (compared when a state is loaded)."""
        return {
            "pattern": self.pattern,
            "n": self.n,
            "m": self.m,
            "granularity": self.granularity,
            "budget": self.budget,
            "one_d": self.one_d,
            "fill": self.fill,
        }

    def _pattern_name(self) -> str:
        return f"{self.n}:{self.m}" if self.pattern == "nm" else self.pattern
