"""The optimizers: SAM (and ASAM) and Sparse SAM."""

from .sam import SAM
from .ssam import SSAM

__all__ = ["SAM", "SSAM"]
