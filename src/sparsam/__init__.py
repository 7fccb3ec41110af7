"""sparsam: Sharpness-Aware Minimization and Sparse SAM for PyTorch."""

from . import masks
from .bn import no_running_stats
from .optim import SAM, SSAM

__version__ = "0.1.0"

__all__ = ["SAM", "SSAM", "masks", "no_running_stats", "__version__"]
