"""Masks set by hand: the mask source of an SSAM built without a sparsity or a mask source."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .base import MaskContext, MaskSource


class ManualMask(MaskSource):
    """Masks chosen by the user, never updated.

    ``SSAM(base, rho=0.05)`` without ``sparsity`` or ``mask`` uses this source: set the masks with
    [`SSAM.set_masks`][sparsam.SSAM.set_masks] before the first step, or give them here, up front.
    They are saved and loaded with the optimizer like the masks of any other source.

    Args:
        masks: optional masks by parameter name (bool tensors of each parameter's shape), used at
            the first step. A parameter left out is not perturbed. Checked when built (names are
            strings, masks bool tensors) and again by the [`SSAM`][sparsam.SSAM] that takes this
            source, which knows the parameters (every name is one of them, every shape fits);
            a bad entry raises an exception naming it.

    ``sparsity`` is the fraction of the perturbable coordinates (groups with ``rho > 0``) that the
    current masks leave unperturbed; it is NaN until masks are set.

    ```python
    import torch
    from torch import nn
    from sparsam import SSAM

    net = nn.Linear(4, 2)
    opt = SSAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[:, :2] = True
    opt.set_masks({net.weight: mask})  # perturb half of the weight, not the bias
    assert abs(opt.sparsity - 6 / 10) < 1e-12
    ```
    """

    def __init__(self, masks: Mapping[str, Tensor] | None = None) -> None:
        super().__init__(0.0)
        self.sparsity = math.nan  # known once masks are set
        if masks is not None and not isinstance(masks, Mapping):
            raise TypeError(f"masks must be a mapping from parameter name to bool tensor, got {type(masks).__name__}")
        self.given = dict(masks) if masks is not None else None
        for name, m in (self.given or {}).items():
            if not isinstance(name, str):
                raise TypeError(
                    f"ManualMask's masks are keyed by parameter name (a str), got the key {name!r} of type "
                    f"{type(name).__name__}"
                )
            if not isinstance(m, Tensor):
                raise TypeError(f"ManualMask's mask for {name!r} must be a tensor, got {type(m).__name__}")
            if m.dtype != torch.bool:
                raise TypeError(f"ManualMask's mask for {name!r} must have dtype torch.bool, got {m.dtype}")

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        if self.given is None:
            raise RuntimeError(
                "SSAM has no masks: it was built without sparsity= or mask=, so its masks are set by hand; "
                "call set_masks({...}) before the first step (or build it with sparsity=... or mask=...)"
            )
        return dict(self.given)

    def settings(self) -> dict[str, Any]:
        return {}  # its sparsity is that of the masks set, which the optimizer saves and checks

    def state_dict(self) -> dict[str, Any]:
        # The masks themselves are saved by the optimizer, as for every source.
        return {"sparsity": None if math.isnan(self.sparsity) else self.sparsity, "update_every": None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        s = state.get("sparsity")
        self.sparsity = math.nan if s is None else float(s)

    def extra_repr(self) -> str:
        given = "none" if self.given is None else f"{len(self.given)} given"
        return f"sparsity={self.sparsity}, masks={given}"


__all__ = ["ManualMask"]
