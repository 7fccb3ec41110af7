"""The training wing: config, the registry of methods, the training loop, run directories, presets, reports.

```python
from sparsam.train import build_config, train

cfg = build_config([("example", {"opt": "ssam", "mask": "fisher", "epochs": 2, "out": "runs/x"})])
result = train(cfg)
```

The command line (``sparsam train|demo|sweep|report|analyze``, in ``sparsam.cli``) is a thin layer
over these functions; the Training guide documents them, and ``docs/design.md`` how the modules fit.
"""

from .config import TrainConfig, build_config, validate
from .engine import train
from .run import RunResult
from .errors import CheckpointError, ConfigError, RunDirError, UserError
from .methods import METHODS
from .presets import get_preset, list_presets
from .rundir import RunRecord, find_runs, load_run

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
