"""sparsam: Sharpness-Aware Minimization and Sparse SAM for PyTorch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["MSAM", "SAM", "SSAM", "SparseMSAM", "masks", "no_running_stats", "__version__"]

# The names are loaded on first use (PEP 562), so that `import sparsam` (and the `sparsam` command,
# before it knows what it will run) does not import torch: a Ctrl-C in a command's first seconds
# then reaches the command, which ends with "aborted" instead of a traceback from inside an import.
_LAZY = {
    "MSAM": ".optim",
    "SAM": ".optim",
    "SSAM": ".optim",
    "SparseMSAM": ".optim",
    "no_running_stats": ".bn",
    "masks": ".masks",
}

if TYPE_CHECKING:  # what static tools (type checkers, the API reference) see
    from . import masks
    from .bn import no_running_stats
    from .optim import MSAM, SAM, SSAM, SparseMSAM


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sparsam' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name], __name__)
    value = module if name == "masks" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
