"""sparsam.analysis: Hessian spectra, loss landscapes, sharpness and mask statistics.

Pure functions over ``(model, loss_fn, data)``, tested against dense references; the figures and
the report come from [`write_report`][sparsam.analysis.write_report].

Conventions shared by every tool (details in the Analysis guide):

- ``data`` is an iterable of ``(inputs, targets)`` batches (or one such pair), read once: the first
  ``n_batches`` batches are moved to ``device`` and reused, so a shuffling loader still defines one
  function. ``loss_fn(model(inputs), targets)`` returns the mean loss of a batch.
- The objective is the size-weighted mean loss ``L(w) = Σ_b (n_b / N) L_b(w)``, i.e. the mean
  over all samples; its Hessian is ``H = Σ_b (n_b / N) H_b``.
- The model's mode is never changed (in train mode BatchNorm uses each batch's statistics, in eval
  mode its running statistics: the caller chooses). Buffers are never written: each forward runs
  with fresh copies of them. Weights moved by a tool are restored bitwise, also on error.
- ``params=`` restricts a tool to a subset of parameters (default: all with ``requires_grad``).
- Randomness comes from ``generator`` (a ``torch.Generator`` or int seed; default seed 0), never
  from the global RNG.
- "Top" eigenvalues are the largest algebraic ones by default (``which="LA"``); ``which="LM"``
  gives PyHessian's largest magnitude.
"""

from .hessian import SpectralDensity, hessian_trace, hessian_vector_product, spectral_density, top_eigenvalues
from .landscape import filter_normalize, linear_interpolation, loss_landscape_1d, loss_landscape_2d, random_direction
from .mask_history import (
    density_by_depth,
    density_by_type,
    layer_densities,
    mask_overlaps,
    mask_run_summary,
    overall_densities,
)
from .report import write_report
from .sharpness import mean_loss, sam_sharpness

__all__ = [
    "SpectralDensity",
    "density_by_depth",
    "density_by_type",
    "filter_normalize",
    "hessian_trace",
    "hessian_vector_product",
    "layer_densities",
    "linear_interpolation",
    "loss_landscape_1d",
    "loss_landscape_2d",
    "mask_overlaps",
    "mask_run_summary",
    "mean_loss",
    "overall_densities",
    "random_direction",
    "sam_sharpness",
    "spectral_density",
    "top_eigenvalues",
    "write_report",
]
