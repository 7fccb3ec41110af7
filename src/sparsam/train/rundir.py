"""The run directory: what is in it, whether it holds a run, and reading it back.

Layout (every JSON file is written atomically; ``metrics.jsonl`` is appended once per epoch)::

    RUN_DIR/
      config.json      {"config": resolved TrainConfig, "sparsam_version", "git_commit" (or null),
                        "torch_version", "python_version", "created", "argv", "world_size",
                        "device", "data": {name, num_classes, in_channels, image_size,
                        train_size, test_size, augment, mode, steps_per_epoch, mean, std}}
      metrics.jsonl    one JSON object per epoch (see :data:`METRIC_KEYS`)
      checkpoint.pt    latest checkpoint (see sparsam.train.checkpoint), every epoch
      best_model.pt    {"model": state_dict, "epoch", "test_acc"} of the best epoch so far
      summary.json     written when the run finishes: final/best accuracy, timings
      tensorboard/     only with --tensorboard
      debug/           only with SPARSAM_DEBUG_RANK_DUMP=1: each rank's final weights
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import read_json, remove_stale_temp_files

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BEST = "best_model.pt"
SUMMARY = "summary.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY)
RUN_DIRS = ("tensorboard", "debug")

#: keys of every metrics.jsonl line (mask_* only for SSAM)
METRIC_KEYS = (
    "epoch", "step", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_time_s", "eval_time_s",
    "time_s", "wall_time_s", "samples_per_s", "steps", "train_samples",
)


def state(out: str | os.PathLike[str]) -> str:
    """``"empty"`` (no run), ``"started"`` (config.json, no finished summary) or ``"finished"``."""
    out = Path(out)
    summary = out / SUMMARY
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("finished"):
                return "finished"
        except (OSError, ValueError):
            pass
    if (out / CONFIG).is_file() or (out / CHECKPOINT).is_file():
        return "started"
    return "empty"


def clear(out: str | os.PathLike[str]) -> None:
    """Remove the files a run writes (and only those) for ``--overwrite``, including the temporary
    files a killed write left behind."""
    out = Path(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    remove_stale_temp_files(out, RUN_FILES)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)


def read_metrics(out: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epoch records of a run. A torn last line (a crash while appending) is ignored."""
    path = Path(out) / METRICS
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def git_commit() -> tuple[str | None, bool | None]:
    """(commit hash, dirty) of the git checkout holding this package, or (None, None)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=5, check=True,
        ).stdout.strip() != ""
        return (commit or None), dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


@dataclass
class RunRecord:
    """A run directory read back (for ``report``, ``sweep`` and ``analyze``)."""

    path: Path
    config: dict[str, Any]
    meta: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] | None

    @property
    def finished(self) -> bool:
        return bool(self.summary and self.summary.get("finished"))


def load_run(path: str | os.PathLike[str]) -> RunRecord:
    p = Path(path)
    meta = read_json(p / CONFIG)
    summary = read_json(p / SUMMARY) if (p / SUMMARY).is_file() else None
    return RunRecord(path=p, config=dict(meta.get("config", {})), meta=meta, metrics=read_metrics(p), summary=summary)


def find_runs(paths: list[str]) -> list[Path]:
    """Run directories among ``paths``: each path is a run directory (has config.json) or a folder
    searched recursively for them. Sorted, without duplicates."""
    found: set[Path] = set()
    for raw in paths:
        p = Path(raw)
        if (p / CONFIG).is_file():
            found.add(p.resolve())
        elif p.is_dir():
            found.update(c.parent.resolve() for c in p.rglob(CONFIG))
    return sorted(found)
