"""The training wing: config, the registry of methods, the training loop, presets.

```python
from sparsam.train import build_config, train

cfg = build_config([("example", {"opt": "ssam", "mask": "fisher", "epochs": 2, "out": "runs/x"})])
result = train(cfg)
```

The run directory (its bookkeeping, checkpoints, reading runs back, the report's tables and
figures) is ``sparsam.runs``; ``train``, ``RunResult``, ``load_run``, ``find_runs`` and
``RunRecord`` are re-exported here. The command line (``sparsam train|demo|sweep|report|analyze``,
in ``sparsam.cli``) is a thin layer over these functions; the Training guide documents them, and
``docs/design.md`` how the modules fit.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import TrainConfig, build_config, validate
from .errors import CheckpointError, ConfigError, RunDirError, UserError
from .methods import METHODS
from .presets import get_preset, list_presets

# The loop and the run directory are loaded on first use (PEP 562): ``sparsam.runs`` builds on
# this package's config and registry, so importing them here would run ``sparsam.runs`` half-way
# through whenever a ``sparsam.runs`` module is imported first.
_LAZY = {
    "train": ".engine",
    "RunResult": "..runs.run",
    "RunRecord": "..runs.rundir",
    "find_runs": "..runs.rundir",
    "load_run": "..runs.rundir",
}

if TYPE_CHECKING:  # what static tools (type checkers, the API reference) see
    from ..runs.run import RunResult
    from ..runs.rundir import RunRecord, find_runs, load_run
    from .engine import train


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__all__ = [
    "METHODS",
    "CheckpointError",
    "ConfigError",
    "RunDirError",
    "RunRecord",
    "RunResult",
    "TrainConfig",
    "UserError",
    "build_config",
    "find_runs",
    "get_preset",
    "list_presets",
    "load_run",
    "train",
    "validate",
]
