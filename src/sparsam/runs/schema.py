"""What each run file must hold, checked whenever a command reads it back.

``sparsam report``, ``sparsam analyze`` and ``sparsam train --resume`` read a run directory
(``sparsam.runs.rundir``) through these checks, one per file: ``config.json``, ``metrics.jsonl``,
``summary.json`` and ``checkpoint.pt``. A file that does not hold what sparsam writes raises a
[`RunFileError`][sparsam.runs.schema.RunFileError] whose one line names the file and its first
bad line or key; the file is never changed. So a garbled line, a value of the wrong type or bytes
that are not UTF-8 text stop the command with a message, instead of a table that silently leaves
an epoch out or a traceback.

The one thing tolerated is what an interrupted append by an earlier sparsam leaves: a last
``metrics.jsonl`` line without its newline that is not JSON (today every rewrite of a run file is
atomic, so no run of this version leaves one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..train.config import TrainConfig, check_keys, validate
from ..train.errors import CheckpointError, ConfigError, RunDirError
from ..train.errors import damaged_file_advice as _advice


class RunFileError(RunDirError):
    """A run file (config.json, metrics.jsonl, summary.json) does not hold what sparsam writes: the
    message names the file and its first bad line or key. The file is left as it is."""


_DAMAGED = "the file is damaged and was left as it is: restore it from a backup, or repair it"


# ------------------------------------------------------------------------------------------ reading
def read_text(path: str | os.PathLike[str]) -> str:
    """The file's text, or a ``RunFileError`` if it cannot be read or is not UTF-8 text (naming the
    line of the first bad byte)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise RunFileError(f"cannot read {p}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RunFileError(
            f"{p}: line {line} holds bytes that are not UTF-8 text (byte {e.start}); {_DAMAGED}"
        ) from None


def load_json(path: str | os.PathLike[str]) -> Any:
    """A whole JSON file, or a ``RunFileError`` naming the file and the place it stops being JSON."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RunFileError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {_DAMAGED}") from None


# ------------------------------------------------------------------------------------------ values
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _kind(v: Any) -> str:
    return "null" if v is None else f"{type(v).__name__} {v!r}"[:60]


# ------------------------------------------------------------------------------------------ config.json
def check_config(meta: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a whole ``config.json`` (``meta``, already parsed): an object whose ``"config"`` entry
    holds valid settings (known keys, values of the right type and range; the ``data`` folder need not
    exist any more). Returns ``meta``."""
    if not isinstance(meta, dict):
        raise RunFileError(
            f"{path} is damaged: it holds a JSON {type(meta).__name__}, not an object with a 'config' entry"
        )
    settings = meta.get("config")
    if not isinstance(settings, dict):
        got = "no 'config' entry" if "config" not in meta else f"a {type(settings).__name__} as 'config'"
        raise RunFileError(f"{path} is damaged: it holds {got}, not an object of settings")
    try:
        values = check_keys(settings, str(path))
        validate(TrainConfig(**{**values, "data": "digits"}))  # the data folder may have moved since the run
    except ConfigError as e:
        msg = str(e).splitlines()[0]
        raise RunFileError(msg if str(path) in msg else f"{path}: {msg}") from None
    return meta


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a ``config.json`` file; see ``check_config``."""
    return check_config(load_json(path), path)


# ------------------------------------------------------------------------------------------ metrics.jsonl
#: keys every metrics line holds, with what each must be ("int", "number", or "number|null")
METRIC_FIELDS: dict[str, str] = {
    "epoch": "int",
    "step": "int",
    "lr": "number",
    "train_loss": "number",
    "train_acc": "number",
    "test_loss": "number|null",  # null: an epoch not evaluated on the test set
    "test_acc": "number|null",
    "epoch_time_s": "number",
    "eval_time_s": "number",
    "time_s": "number",
    "wall_time_s": "number",
    "samples_per_s": "number|null",
    "steps": "int",
    "train_samples": "int",
}
#: keys a line may hold (older runs lack them), with what each must be
OPTIONAL_METRIC_FIELDS: dict[str, str] = {
    "compute": "number|null",
    "mask_density": "number|null",
    "mask_perturbed": "number|null",
    "mask_overlap": "number|null",
    "mask_jaccard": "number|null",
    "mask_changed": "number|null",
}


def _check_value(v: Any, kind: str) -> bool:
    base, _, null = kind.partition("|")
    if v is None:
        return null == "null"
    return _is_int(v) if base == "int" else _is_number(v)


def parse_metrics(text: str, path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl`` text, each line checked: a JSON object holding every
    key of ``METRIC_FIELDS`` with a value of its kind, epochs 1, 2, 3, ... in order. The first bad
    line raises a ``RunFileError`` naming the file, the line and the problem."""
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # the last line, without its newline: an append interrupted by a crash
                break
            raise RunFileError(f"{path}: line {n} is not valid JSON ({e.msg}, column {e.colno}); {_DAMAGED}") from None
        if not isinstance(row, dict):
            raise RunFileError(
                f"{path}: line {n} holds a JSON {type(row).__name__}, not an epoch record (an object); {_DAMAGED}"
            )
        for key, kind in METRIC_FIELDS.items():
            if key not in row:
                raise RunFileError(f"{path}: line {n} lacks {key!r}; {_DAMAGED}")
            if not _check_value(row[key], kind):
                raise RunFileError(
                    f"{path}: line {n}: {key!r} must be {kind.replace('|', ' or ')}, got {_kind(row[key])}; {_DAMAGED}"
                )
        for key, kind in OPTIONAL_METRIC_FIELDS.items():
            if key in row and not _check_value(row[key], kind):
                raise RunFileError(
                    f"{path}: line {n}: {key!r} must be {kind.replace('|', ' or ')}, got {_kind(row[key])}; {_DAMAGED}"
                )
        if row["epoch"] != len(rows) + 1:
            raise RunFileError(
                f"{path}: line {n} records epoch {row['epoch']} where epoch {len(rows) + 1} should follow "
                f"(a record is missing, repeated or out of order); {_DAMAGED}"
            )
        rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check a ``metrics.jsonl`` file (``[]`` if it does not exist); see ``parse_metrics``."""
    p = Path(path)
    if not p.exists():
        return []
    return parse_metrics(read_text(p), p)


def metrics_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """``rows`` as ``metrics.jsonl`` text, one JSON object a line."""
    return "".join(json.dumps(dict(r)) + "\n" for r in rows)


# ------------------------------------------------------------------------------------------ summary.json
SUMMARY_FIELDS: dict[str, str] = {
    "epochs": "int",
    "final_test_acc": "number|null",
    "best_test_acc": "number|null",
    "best_epoch": "int|null",
    "final_train_loss": "number|null",
    "final_test_loss": "number|null",
    "train_time_s": "number|null",
    "epoch_time_s_median": "number|null",
    "epoch_time_s_mean": "number|null",
    "steps_per_epoch": "int",
    "time_per_step_s": "number|null",
    "world_size": "int",
}


def check_summary(summary: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a parsed ``summary.json``: an object with ``"finished": true`` and the numbers
    ``finish`` writes, each of its kind (a key may be absent). Returns it."""
    if not isinstance(summary, dict):
        raise RunFileError(f"{path} is damaged: it holds a JSON {type(summary).__name__}, not an object")
    if summary.get("finished") is not True:
        raise RunFileError(
            f"{path}: 'finished' must be true (sparsam writes this file only when a run finishes), got "
            f"{_kind(summary.get('finished'))}; {_DAMAGED}"
        )
    for key, kind in SUMMARY_FIELDS.items():
        if key in summary and not _check_value(summary[key], kind):
            raise RunFileError(
                f"{path}: {key!r} must be {kind.replace('|', ' or ')}, got {_kind(summary[key])}; {_DAMAGED}"
            )
    return summary


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a ``summary.json`` file; see ``check_summary``."""
    return check_summary(load_json(path), path)


# ------------------------------------------------------------------------------------------ checkpoint.pt
#: entries of a training checkpoint and what each must be
CHECKPOINT_FIELDS: dict[str, str] = {
    "epoch": "int>=0",
    "global_step": "int>=0",
    "model": "dict",
    "optimizer": "dict",
    "scheduler": "dict",
    "rng": "dict",
    "config": "dict",
    "best_acc": "number",
    "best_epoch": "int>=0",
    "elapsed_s": "number",
}
_PARTIAL_FIELDS = {
    "step_in_epoch": "int>=0",
    "loss_sum": "number",
    "correct": "int>=0",
    "count": "int>=0",
    "time_s": "number",
    "lr": "number",
}


def _fits(v: Any, kind: str) -> bool:
    if kind == "dict":
        return isinstance(v, dict)
    if kind == "int>=0":
        return _is_int(v) and v >= 0
    return _is_number(v)


def check_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check the entries of a training checkpoint (already read as a dict with sparsam's format
    tag): every entry of ``CHECKPOINT_FIELDS`` present and of its kind, the interrupted epoch's sums
    (``partial``) complete, ``world_size`` a positive integer, the saved settings valid. Raises
    [`CheckpointError`][sparsam.train.CheckpointError] naming the first bad entry."""
    advice = _advice()
    missing = [k for k in CHECKPOINT_FIELDS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged. {advice}")
    for key, kind in CHECKPOINT_FIELDS.items():
        if not _fits(ckpt[key], kind):
            raise CheckpointError(
                f"checkpoint {path}: {key!r} must be {kind.replace('>=0', ' >= 0')}, got {_kind(ckpt[key])}: "
                f"it is damaged. {advice}"
            )
    partial = ckpt.get("partial")
    if partial is not None:
        if not isinstance(partial, dict):
            raise CheckpointError(f"checkpoint {path}: 'partial' must be a dict or None: it is damaged. {advice}")
        for key, kind in _PARTIAL_FIELDS.items():
            if key not in partial or not _fits(partial[key], kind):
                got = "missing" if key not in partial else _kind(partial[key])
                raise CheckpointError(
                    f"checkpoint {path}: 'partial' entry {key!r} must be {kind.replace('>=0', ' >= 0')}, got "
                    f"{got}: it is damaged. {advice}"
                )
    world = ckpt.get("world_size", 1)
    if not (_is_int(world) and world >= 1):
        raise CheckpointError(f"checkpoint {path}: 'world_size' must be a positive integer, got {_kind(world)}")
    record = ckpt.get("record")
    if record is not None and not isinstance(record, dict):
        raise CheckpointError(f"checkpoint {path}: 'record' must be a dict or None: it is damaged. {advice}")
    try:
        check_keys(ckpt["config"], f"checkpoint {path}")
    except ConfigError as e:
        raise CheckpointError(f"{str(e).splitlines()[0]}: the checkpoint is damaged. {advice}") from None
    return ckpt


__all__ = [
    "CHECKPOINT_FIELDS",
    "METRIC_FIELDS",
    "OPTIONAL_METRIC_FIELDS",
    "SUMMARY_FIELDS",
    "RunFileError",
    "check_checkpoint",
    "check_config",
    "check_summary",
    "load_json",
    "metrics_text",
    "parse_metrics",
    "read_config",
    "read_metrics",
    "read_summary",
    "read_text",
]
