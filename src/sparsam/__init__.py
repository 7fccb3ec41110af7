"""sparsam: Sharpness-Aware Minimization and Sparse SAM for PyTorch."""

from . import masks
from .bn import no_running_stats
from .optim import MSAM, SAM, SSAM, SparseMSAM

__version__ = "0.1.0"

__all__ = ["MSAM", "SAM", "SSAM", "SparseMSAM", "masks", "no_running_stats", "__version__"]
