"""The optimizers: SAM (and ASAM), Sparse SAM and Momentum-SAM."""

from .msam import MSAM, SparseMSAM
from .sam import SAM
from .ssam import SSAM

__all__ = ["MSAM", "SAM", "SSAM", "SparseMSAM"]
