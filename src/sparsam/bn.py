"""Normalisation statistics from the clean pass only.

SAM's second forward pass runs at the perturbed weights ``w + e``. Batch statistics gathered there
describe a model that is never deployed, so running statistics (BatchNorm's ``running_mean``,
``running_var`` and ``num_batches_tracked``) must be updated by the clean pass at ``w`` only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextmanager
def no_running_stats(model: nn.Module | None) -> Iterator[None]:
    """Within this context, BatchNorm layers in training mode use batch statistics as usual but do
    not update their running statistics (nor ``num_batches_tracked``).

    It switches ``track_running_stats`` off for the duration, which is how PyTorch's own
    ``F.batch_norm`` call is told not to touch the buffers; the flag is restored on exit, also on
    error. Works for BatchNorm1d/2d/3d, SyncBatchNorm and lazy variants. Layers in eval mode, or
    already without running statistics, are left alone. ``model=None`` is a no-op.

    Unlike the common trick of setting ``momentum = 0`` (davda54/sam), this also keeps
    ``num_batches_tracked`` unchanged and is correct for ``momentum=None`` (cumulative average).
    """
    if model is None:
        yield
        return
    switched: list[_BatchNorm] = []
    try:
        for m in model.modules():
            if isinstance(m, _BatchNorm) and m.training and m.track_running_stats and m.running_mean is not None:
                m.track_running_stats = False
                switched.append(m)
        yield
    finally:
        for m in switched:
            m.track_running_stats = True
