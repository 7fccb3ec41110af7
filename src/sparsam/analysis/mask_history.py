"""Run-level statistics of SSAM masks: density per layer over time, which layer types and depths the
masks favour, and how much successive masks overlap.

A run is a sequence of mask dicts ``{parameter name: bool tensor}`` (e.g. the masks after each
update). Following SSAM's mask protocol, a name missing from one dict is taken as all False (not
perturbed) there, with its shape taken from another step or from the model. Numeric 0/1 tensors are
accepted too. Every function returns plain Python dicts and lists of floats (JSON-ready).

Densities of groups (the whole model, a layer type, a layer) are *pooled*: active coordinates of the
group divided by its size, not an average of per-tensor densities; a group without coordinates has
density 1. The per-step numbers follow the conventions of ``sparsam.masks.mask_stats`` (which
summarises a single step for logging), so the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "density_by_depth",
    "density_by_type",
    "layer_densities",
    "mask_overlaps",
    "mask_run_summary",
    "overall_densities",
]

MaskDict = Mapping[str, Tensor]


def _as_bool(t: Any, name: str, step: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"masks[{step}][{name!r}] must be a tensor, got {type(t).__name__}")
    if t.dtype == torch.bool:
        return t
    b = t != 0
    if not bool(((t == 0) | (t == 1)).all()):
        raise ValueError(f"masks[{step}][{name!r}] must be boolean or hold only 0 and 1")
    return b


def _normalise(masks: Iterable[MaskDict], model: nn.Module | None = None) -> tuple[list[dict[str, Tensor]], list[str]]:
    """Materialise the run: a list of complete {name: bool tensor} dicts with the same names and shapes."""
    if isinstance(masks, Mapping):
        raise TypeError("masks must be a sequence of mask dicts (one per step), got a single dict; wrap it in a list")
    run = list(masks)
    if not run:
        raise ValueError("masks is empty: give at least one mask dict")
    shapes: dict[str, torch.Size] = {}
    order: list[str] = []
    if model is not None:
        for name, p in model.named_parameters():
            shapes[name] = p.shape
    for step, m in enumerate(run):
        if not isinstance(m, Mapping):
            raise TypeError(f"masks[{step}] must be a dict name -> bool tensor, got {type(m).__name__}")
        for name, t in m.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"masks[{step}][{name!r}] must be a tensor, got {type(t).__name__}")
            if name in shapes and shapes[name] != t.shape:
                raise ValueError(f"masks[{step}][{name!r}] has shape {tuple(t.shape)}, expected {tuple(shapes[name])}")
            shapes.setdefault(name, t.shape)
            if name not in order:
                order.append(name)
    if model is not None:
        # model order (depth), parameters never masked included only if some step names them
        names_in_model = [n for n, _ in model.named_parameters()]
        unknown = [n for n in order if n not in names_in_model]
        if unknown:
            raise ValueError(f"mask name {unknown[0]!r} is not a parameter of the model")
        order = [n for n in names_in_model if n in order]
    out: list[dict[str, Tensor]] = []
    for step, m in enumerate(run):
        full = {}
        for name in order:
            if name in m:
                full[name] = _as_bool(m[name], name, step)
            else:
                device = next(iter(m.values())).device if m else torch.device("cpu")
                full[name] = torch.zeros(shapes[name], dtype=torch.bool, device=device)
        out.append(full)
    return out, order


def _count(t: Tensor) -> int:
    return int(t.count_nonzero())


def _density(active: int, size: int) -> float:
    return active / size if size else 1.0


def layer_densities(masks: Iterable[MaskDict]) -> dict[str, list[float]]:
    """Density (fraction of True) of every tensor at every step: ``{name: [d_0, d_1, ...]}``."""
    run, order = _normalise(masks)
    return {n: [_density(_count(m[n]), m[n].numel()) for m in run] for n in order}


def overall_densities(masks: Iterable[MaskDict]) -> list[float]:
    """Pooled density of all masked tensors at every step."""
    run, order = _normalise(masks)
    size = sum(run[0][n].numel() for n in order)
    return [_density(sum(_count(m[n]) for n in order), size) for m in run]


def _param_owners(model: nn.Module) -> dict[str, tuple[str, str, str]]:
    """name -> (module path, module class name, local parameter name)."""
    owners: dict[str, tuple[str, str, str]] = {}
    for mod_name, mod in model.named_modules():
        for local, _ in mod.named_parameters(recurse=False):
            full = f"{mod_name}.{local}" if mod_name else local
            owners.setdefault(full, (mod_name, type(mod).__name__, local))
    return owners


def _type_key(name: str, t: Tensor, owners: Mapping[str, tuple[str, str, str]] | None) -> str:
    if owners is not None and name in owners:
        _, cls, local = owners[name]
        return f"{cls}.{local}"
    return "matrix/conv (ndim >= 2)" if t.dim() >= 2 else "vector (ndim <= 1)"


def density_by_type(masks: Iterable[MaskDict], model: nn.Module | None = None) -> dict[str, list[float]]:
    """Pooled density per layer type at every step.

    With ``model``, the key is the owning module's class and the parameter's local name
    (``"Conv2d.weight"``, ``"BatchNorm2d.bias"``, ...); without it, tensors are grouped by
    dimensionality (``"matrix/conv (ndim >= 2)"`` and ``"vector (ndim <= 1)"``).
    """
    run, order = _normalise(masks, model)
    owners = _param_owners(model) if model is not None else None
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(_type_key(n, run[0][n], owners), []).append(n)
    out: dict[str, list[float]] = {}
    for key, names in groups.items():
        size = sum(run[0][n].numel() for n in names)
        out[key] = [_density(sum(_count(m[n]) for n in names), size) for m in run]
    return out


def density_by_depth(masks: Iterable[MaskDict], model: nn.Module | None = None) -> dict[str, float]:
    """Pooled density per layer, averaged over the steps, in depth order (input to output).

    A layer is a module owning parameters (with ``model``) or the name's prefix before the last dot
    (without it: ``"layer1.0.conv1.weight"`` -> ``"layer1.0.conv1"``); the order is the model's
    parameter order, or the order in which names first appear in the run.
    """
    run, order = _normalise(masks, model)
    owners = _param_owners(model) if model is not None else None
    layers: dict[str, list[str]] = {}
    for n in order:
        layer = owners[n][0] if owners is not None and n in owners else n.rpartition(".")[0] or n
        layers.setdefault(layer or "(root)", []).append(n)
    out: dict[str, float] = {}
    for layer, names in layers.items():
        size = sum(run[0][n].numel() for n in names)
        per_step = [_density(sum(_count(m[n]) for n in names), size) for m in run]
        out[layer] = sum(per_step) / len(per_step)
    return out


def _jaccard(a: int, b: int, inter: int) -> float:
    union = a + b - inter
    return inter / union if union else 1.0


def mask_overlaps(masks: Iterable[MaskDict]) -> dict[str, Any]:
    """Overlap between successive masks ``M_{t-1}``, ``M_t`` (one value per pair, ``len(run) - 1``).

    Returns:
        ``{"jaccard": [...], "overlap": [...], "changed": [...], "layer_jaccard": {name: [...]}}``
        with, pooled over all tensors, ``jaccard = |M_{t-1} & M_t| / |M_{t-1} | M_t|`` (1 when
        both are empty), ``overlap = |M_{t-1} & M_t| / |M_{t-1}|``, the fraction of previously
        active coordinates still active (``nan`` when ``M_{t-1}`` is empty), and ``changed``, the
        number of coordinates that flipped (int); ``layer_jaccard`` is the Jaccard index per tensor.
    """
    run, order = _normalise(masks)
    jac: list[float] = []
    ret: list[float] = []
    changed: list[int] = []
    per_layer: dict[str, list[float]] = {n: [] for n in order}
    for prev, cur in zip(run, run[1:]):
        a_tot = b_tot = i_tot = 0
        for n in order:
            a, b, i = _count(prev[n]), _count(cur[n]), _count(prev[n] & cur[n])
            per_layer[n].append(_jaccard(a, b, i))
            a_tot, b_tot, i_tot = a_tot + a, b_tot + b, i_tot + i
        jac.append(_jaccard(a_tot, b_tot, i_tot))
        ret.append(i_tot / a_tot if a_tot else math.nan)
        changed.append(a_tot + b_tot - 2 * i_tot)
    return {"jaccard": jac, "overlap": ret, "changed": changed, "layer_jaccard": per_layer}


def mask_run_summary(masks: Iterable[MaskDict], model: nn.Module | None = None) -> dict[str, Any]:
    """Everything above for one run, as one JSON-ready dict.

    Keys: ``steps``; ``overall_density`` (per step); ``layer_density`` (name -> per step);
    ``mean_layer_density`` (name -> mean over steps); ``type_density`` (per step, see
    [`density_by_type`][sparsam.analysis.density_by_type]); ``depth_density`` (see
    [`density_by_depth`][sparsam.analysis.density_by_depth]); ``jaccard``, ``overlap``,
    ``changed`` and ``layer_jaccard`` (see [`mask_overlaps`][sparsam.analysis.mask_overlaps]);
    ``ever_active`` (fraction of
    coordinates active in at least one step) and ``always_active`` (in every step).
    """
    run, order = _normalise(masks, model)
    layer = layer_densities(run)
    overlaps = mask_overlaps(run)
    size = sum(run[0][n].numel() for n in order)
    ever = always = 0
    for n in order:
        stack = torch.stack([m[n] for m in run])
        ever += _count(stack.any(dim=0))
        always += _count(stack.all(dim=0))
    return {
        "steps": len(run),
        "overall_density": overall_densities(run),
        "layer_density": layer,
        "mean_layer_density": {n: sum(v) / len(v) for n, v in layer.items()},
        "type_density": density_by_type(run, model),
        "depth_density": density_by_depth(run, model),
        "jaccard": overlaps["jaccard"],
        "overlap": overlaps["overlap"],
        "changed": overlaps["changed"],
        "layer_jaccard": overlaps["layer_jaccard"],
        "ever_active": _density(ever, size),
        "always_active": _density(always, size),
    }
