"""Mask statistics for logging: densities and the overlap between successive masks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import Tensor


def mask_stats(masks: Mapping[str, Tensor], previous: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """Summarise masks as plain Python numbers (one host sync per tensor; call it when logging).

    Returns a dict with
        ``numel``: coordinates covered; ``perturbed``: coordinates set (ints);
        ``density``: ``perturbed / numel`` (1.0 for no coordinates);
        ``density_per_param``: name -> density of that tensor (1.0 for an empty tensor);
    and, when ``previous`` is given (A = previous, B = masks; a name missing from either counts as
    all false):
        ``overlap``: ``|A & B| / |A|``, the fraction of previously perturbed coordinates still
        perturbed (``nan`` when A is empty);
        ``jaccard``: ``|A & B| / |A | B|`` (1.0 when both are empty);
        ``changed``: number of coordinates whose value flipped (int).
    """
    numel = perturbed = 0
    per_param: dict[str, float] = {}
    for name, m in masks.items():
        k, n = int(m.count_nonzero()), m.numel()
        per_param[name] = k / n if n else 1.0
        numel += n
        perturbed += k
    out: dict[str, Any] = {
        "numel": numel,
        "perturbed": perturbed,
        "density": perturbed / numel if numel else 1.0,
        "density_per_param": per_param,
    }
    if previous is not None:
        inter = prev_count = union = 0
        for name in list(masks) + [n for n in previous if n not in masks]:
            b = masks.get(name)
            a = previous.get(name)
            if a is None:  # then the name came from masks: b is a tensor
                union += int(cast(Tensor, b).count_nonzero())
                continue
            if b is None:
                ca = int(a.count_nonzero())
                prev_count += ca
                union += ca
                continue
            a = a.to(device=b.device, dtype=torch.bool)
            b = b.to(torch.bool)
            if a.shape != b.shape:
                raise ValueError(f"masks[{name!r}] has shape {tuple(b.shape)} but previous has {tuple(a.shape)}")
            inter += int((a & b).count_nonzero())
            prev_count += int(a.count_nonzero())
            union += int((a | b).count_nonzero())
        out["overlap"] = inter / prev_count if prev_count else float("nan")
        out["jaccard"] = inter / union if union else 1.0
        out["changed"] = union - inter
    return out
