"""Mask sources for SSAM and the helpers they share.

* [`select`][sparsam.masks.select]: scores -> boolean masks (unstructured, structured, N:M), shared by
  every source.
* Sources ([`MaskSource`][sparsam.masks.MaskSource] protocol, see ``sparsam.masks.base``):
  [`FisherMask`][sparsam.masks.FisherMask]
  (SSAM-F), [`DynamicMask`][sparsam.masks.DynamicMask] (SSAM-D),
  [`RandomMask`][sparsam.masks.RandomMask], [`NormLayersMask`][sparsam.masks.NormLayersMask] (SAM-ON
  style), [`AllOnesMask`][sparsam.masks.AllOnesMask] (= SAM), [`ManualMask`][sparsam.masks.ManualMask]
  (masks set by hand).
* [`fisher_information`][sparsam.masks.fisher_information]: batched diagonal empirical Fisher;
  [`mask_stats`][sparsam.masks.mask_stats]: logging.

Conventions are in ``docs/masks.md``.
"""

from .base import AllOnesMask, MaskContext, MaskSource, SeededSource, check_sparsity
from .dynamic import DynamicMask, cosine_drop_rate
from .fisher import FisherMask, fisher_information
from .manual import ManualMask
from .norm import NORM_TYPES, NormLayersMask
from .random import RandomMask
from .selection import keep_count, nm_mask, select
from .stats import mask_stats

__all__ = [
    "NORM_TYPES",
    "AllOnesMask",
    "DynamicMask",
    "FisherMask",
    "ManualMask",
    "MaskContext",
    "MaskSource",
    "NormLayersMask",
    "RandomMask",
    "SeededSource",
    "check_sparsity",
    "cosine_drop_rate",
    "fisher_information",
    "keep_count",
    "mask_stats",
    "nm_mask",
    "select",
]
