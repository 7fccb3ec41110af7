"""Mask sources for SSAM and the helpers they share."""

from .base import AllOnesMask, MaskContext, MaskSource, check_sparsity
from .random import RandomMask

__all__ = ["AllOnesMask", "MaskContext", "MaskSource", "RandomMask", "check_sparsity"]
