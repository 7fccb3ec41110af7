"""Checkpoints and run-directory files: atomic writes, RNG states, clear errors on bad files.

Checkpoint format (``checkpoint.pt``, a ``torch.save`` dict loadable with ``weights_only=True``):

```text
format          "sparsam-checkpoint"          format_version  1
epoch           completed epochs               step_in_epoch   steps done in epoch `epoch`
global_step     optimizer steps so far         (0 unless saved by an interruption mid-epoch)
model           the model's state_dict (unwrapped: no "module." / "_orig_mod." prefixes)
optimizer       the optimizer's state_dict (SAM/SSAM: base state + "sparsam" entry with masks)
scheduler       the LR scheduler's state_dict
scaler          the GradScaler's state_dict, or None
rng             {"torch", "cuda", "numpy", "python"} generator states
partial         running sums of the interrupted epoch (or None)
best_acc, best_epoch, elapsed_s, config, version, world_size
```

Every file is written to a temporary name in the same folder, flushed to disk and renamed into
place (``os.replace``), so a crash never leaves a half-written checkpoint behind. A write that
fails (a full disk) removes its temporary file and raises a ``CheckpointError`` saying why; the
previous file stays as it was. Temporary files left by a process that was killed while writing are
removed by ``remove_stale_temp_files`` (called when a run starts, resumes or is overwritten).

Reading checks the file before unpickling: the CRC-32 that the zip format stores for every part
must match, so a file changed on disk after it was written (a flipped bit) is reported as damaged
rather than loaded with wrong weights. Files are always read with ``weights_only=True``.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..train.errors import CheckpointError
from ..train.errors import damaged_file_advice as _advice

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


def write_json(path: str | os.PathLike[str], obj: Any, *, what: str = "file") -> None:
    """Pretty JSON, written atomically; see ``write_text``."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n", what=what)


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "file") -> None:
    """``text`` (UTF-8) to ``path`` atomically. A failed write raises
    [`CheckpointError`][sparsam.train.CheckpointError] naming the file and the reason (the disk is
    full, the folder is read-only, ...); the previous file at ``path`` is left as it was."""
    data = text.encode("utf-8")

    def write(f: BinaryIO) -> None:
        f.write(data)

    try:
        atomic_write(path, write)
    except OSError as e:
        raise _write_failed(Path(path), e, what) from None


def read_json(path: str | os.PathLike[str]) -> Any:
    """A JSON file of the run directory; a file that cannot be read, is not UTF-8 text or is not
    JSON raises a ``RunFileError`` (a [`UserError`][sparsam.train.UserError]) naming it."""
    from .schema import load_json

    return load_json(path)


# ------------------------------------------------------------------------------------------ RNG
def rng_state() -> dict[str, Any]:
    """The global generators' states (torch CPU, every CUDA device, numpy, Python)."""
    np_state: Any = np.random.get_state()  # the legacy tuple (kind, keys, pos, has_gauss, cached_gaussian)
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
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ------------------------------------------------------------------------------------------ save / load
class CheckpointWriteError(CheckpointError, OSError):
    """A file of the run could not be written (a full disk, ...); the previous file is kept. Both a
    user error (one line, exit status 2) and an ``OSError``."""


class _WriteRecorder:
    """A file wrapper that remembers the OSError of a failed write: torch.save turns it into
    "enforce fail ... unexpected pos", which no longer says that the disk is full."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, b: Any) -> int:
        try:
            return self.f.write(b)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch_file(path: str | os.PathLike[str], obj: Any, *, what: str = "checkpoint") -> None:
    """``torch.save(obj)`` to ``path`` atomically. A failed write raises
    [`CheckpointError`][sparsam.train.CheckpointError]
    naming the reason (the disk is full, ...); the temporary file is removed and a previous file at
    ``path`` is left as it was."""
    path = Path(path)
    recorders: list[_WriteRecorder] = []

    def write(f: BinaryIO) -> None:
        recorders.append(_WriteRecorder(f))
        torch.save(obj, recorders[-1])  # type: ignore[arg-type]  # torch.save wants a file type; the recorder is file-like

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        err = e if isinstance(e, OSError) else (recorders[-1].error if recorders else None)
        raise _write_failed(path, err, what, fallback=e) from None


def _write_failed(
    path: Path, err: OSError | None, what: str, *, fallback: BaseException | None = None
) -> CheckpointWriteError:
    """The one-line error of a failed write of ``path``: why (a full disk says so, with the space
    left) and whether a previous file is kept."""
    if err is not None and err.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free)"
        except OSError:
            free = ""
        why = f"the disk is full{free}"
    elif err is not None:
        why = f"{err.strerror or err}"
    else:
        why = (str(fallback).strip().splitlines() or [type(fallback).__name__])[0]
    kept = f"the previous {path.name} is kept as it was" if path.exists() else f"no {path.name} was written"
    return CheckpointWriteError(f"could not write the {what} {path}: {why}; {kept}")


def save_checkpoint(path: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write a checkpoint atomically (``payload`` gets the format fields added); see
    ``save_torch_file`` for what a failed write does."""
    full = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    save_torch_file(path, full)


def remove_stale_temp_files(folder: str | os.PathLike[str], names: tuple[str, ...] | None = None) -> list[Path]:
    """Remove the temporary files that ``atomic_write`` leaves behind when its process is killed
    mid-write (``.<name>.<random>.tmp``), for the given file names (default: every name). Only call
    it while no other process writes to ``folder`` (the run directory's lock). Returns what it removed."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        n = p.name
        if not (n.startswith(".") and n.endswith(".tmp") and p.is_file()):
            continue
        if names is not None and not any(n.startswith(f".{name}.") for name in names):
            continue
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def read_torch_file(path: str | os.PathLike[str], *, map_location: Any = "cpu", what: str = "checkpoint") -> Any:
    """``torch.load(path, weights_only=True)`` after checking that the file is whole.

    Raises [`CheckpointError`][sparsam.train.CheckpointError] (never touching the file) when it is
    missing, truncated, damaged (a part whose CRC-32 does not match: changed on disk after it was
    written) or holds Python objects that a safe load refuses. The message never suggests loading
    unsafely.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {what} at {path}")
    size = path.stat().st_size
    if size == 0 or not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what} {path} is truncated or corrupted ({size} bytes, not a complete torch.save archive). {_advice()}"
        )
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()  # reads every part and compares its CRC-32
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{what} {path} is damaged ({type(e).__name__}: {e}). {_advice()}") from None
    if bad is not None:
        raise CheckpointError(
            f"{what} {path} is damaged: its part {bad!r} does not match the checksum stored with it (the file "
            f"changed after it was written: a disk, copy or transfer error). {_advice()}"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        # torch's text here suggests weights_only=False, i.e. running whatever code the file holds.
        raise CheckpointError(
            f"{what} {path} holds Python objects other than tensors and plain containers, so sparsam does not "
            "load it (it only loads files safely, with weights_only=True): it was not written by sparsam, or it "
            f"is damaged. {_advice()}"
        ) from None
    except Exception as e:  # noqa: BLE001 - RuntimeError / EOFError / zip errors: the file is damaged
        lines = [ln for ln in str(e).strip().splitlines() if "weights_only" not in ln]
        first = lines[0] if lines else type(e).__name__
        raise CheckpointError(f"{what} {path} is damaged: it cannot be decoded ({first}). {_advice()}") from None


def load_checkpoint(path: str | os.PathLike[str], *, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``.

    Raises [`CheckpointError`][sparsam.train.CheckpointError] (never touching the file) when it is
    missing, truncated or otherwise unreadable, or not a sparsam checkpoint.
    """
    path = Path(path)
    ckpt = read_torch_file(path, map_location=map_location)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a sparsam training checkpoint (no format={FORMAT!r} entry)")
    if ckpt.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {ckpt.get('format_version')!r}; this sparsam reads version {FORMAT_VERSION}"
        )
    from .schema import check_checkpoint

    return check_checkpoint(ckpt, path)  # every entry present and of its kind


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CheckpointWriteError",
    "atomic_write",
    "load_checkpoint",
    "read_json",
    "read_torch_file",
    "remove_stale_temp_files",
    "rng_state",
    "save_checkpoint",
    "save_torch_file",
    "set_rng_state",
    "write_json",
    "write_text",
]
