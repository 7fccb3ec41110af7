"""Perturb the normalisation layers only (SAM-ON; Mueller et al., "Normalization Layers Are All
That Sharpness-Aware Minimization Needs", NeurIPS 2023, arXiv 2306.04226)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from .base import MaskContext, MaskSource

# BatchNorm*, SyncBatchNorm, InstanceNorm* (all _NormBase), LayerNorm, GroupNorm, RMSNorm.
NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)
"""The normalisation layer types [`NormLayersMask`][sparsam.masks.NormLayersMask] perturbs: BatchNorm
(also SyncBatchNorm), InstanceNorm, LayerNorm, GroupNorm and, where torch has it, RMSNorm."""


class NormLayersMask(MaskSource):
    """Perturb exactly the parameters (weights and biases) of normalisation layers.

    A parameter is a norm parameter when it is a direct parameter of a module that is an instance
    of ``NORM_TYPES`` (BatchNorm/SyncBatchNorm/InstanceNorm/LayerNorm/GroupNorm/RMSNorm) or
    of ``extra_types``. Norm parameters get an all-true mask, every other perturbable parameter an
    all-false one. Parameters are matched by identity with ``ctx.model``'s, so it needs the model
    (pass ``model=`` to the optimizer). The mask is static. ``sparsity`` is not used (it is 0.0);
    the density follows from the architecture (see [`mask_stats`][sparsam.masks.mask_stats]).
    """

    def __init__(self, extra_types: tuple[type[nn.Module], ...] = ()) -> None:
        super().__init__(0.0)
        extra = tuple(extra_types)
        for t in extra:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"extra_types must hold nn.Module subclasses, got {t!r}")
        self.types = NORM_TYPES + extra

    def init(self, ctx: MaskContext) -> dict[str, Tensor]:
        if ctx.model is None:
            raise ValueError(
                "NormLayersMask needs the model to find its normalisation layers: pass model= to the optimizer"
            )
        norm_ids = {
            id(p) for mod in ctx.model.modules() if isinstance(mod, self.types) for p in mod.parameters(recurse=False)
        }
        return {n: p.new_full(p.shape, id(p) in norm_ids, dtype=torch.bool) for n, p in ctx.params.items()}

    def extra_repr(self) -> str:
        return f"types={[t.__name__ for t in self.types]}"
