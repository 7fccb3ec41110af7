"""Checkpoints and run-directory files: atomic writes, RNG states, clear errors on bad files.

Checkpoint format (``checkpoint.pt``, a ``torch.save`` dict loadable with ``weights_only=True``)::

    format          "sparsam-checkpoint"          format_version  1
    epoch           completed epochs               step_in_epoch   steps done in epoch ``epoch``
    global_step     optimizer steps so far         (0 unless saved by an interruption mid-epoch)
    model           the model's state_dict (unwrapped: no "module." / "_orig_mod." prefixes)
    optimizer       the optimizer's state_dict (SAM/SSAM: base state + "sparsam" entry with masks)
    scheduler       the LR scheduler's state_dict
    scaler          the GradScaler's state_dict, or None
    rng             {"torch", "cuda", "numpy", "python"} generator states
    partial         running sums of the interrupted epoch (or None)
    best_acc, best_epoch, elapsed_s, config, version, world_size

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place (``os.replace``), so a crash never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CheckpointError

FORMAT = "sparsam-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Pretty JSON, written atomically."""
    data = (json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the run directory is damaged") from None


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """The global generators' states (torch CPU, every CUDA device, numpy, Python)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ------------------------------------------------------------------------------------------ save / load
def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (``payload`` gets the format fields added)."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    atomic_write(path, lambda f: torch.save(full, f))


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises :class:`CheckpointError` (never touching the file) when it is missing, truncated or
    otherwise unreadable, or not a sparsam checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    size = path.stat().st_size
    advice = (
        "The file was left as it is: restore it from a backup, or start the run again with --overwrite "
        "(which deletes it)."
    )
    if size == 0 or not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupted ({size} bytes, not a complete torch.save archive). {advice}"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zip errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} cannot be read ({first}). {advice}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsam training checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {ckpt.get('format_version')!r}; this sparsam reads version {FORMAT_VERSION}"
        )
    missing = [k for k in ("epoch", "model", "optimizer", "scheduler", "rng", "config") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is damaged. {advice}")
    return ckpt


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_write",
    "load_checkpoint",
    "read_json",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_json",
]
