"""Mask sources for SSAM and the helpers they share.

* :func:`select`: scores -> boolean masks (unstructured, structured, N:M), shared by every source.
* Sources (:class:`MaskSource` protocol, see :mod:`sparsam.masks.base`): :class:`FisherMask`
  (SSAM-F), :class:`DynamicMask` (SSAM-D), :class:`RandomMask`, :class:`NormLayersMask` (SAM-ON
  style), :class:`AllOnesMask` (= SAM), :class:`ManualMask` (masks set by hand).
* :func:`fisher_information`: batched diagonal empirical Fisher; :func:`mask_stats`: logging.

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
