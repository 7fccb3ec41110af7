"""The run directory: what is in it, whether it holds a run, and reading it back.

Layout (every file is written atomically: to a temporary file in the same folder, flushed to disk
and renamed into place; ``metrics.jsonl`` is rewritten so once per epoch). Readers check each file
against its schema (``sparsam.runs.schema``).

```text
RUN_DIR/
  config.json      {"config": resolved TrainConfig, "sparsam_version", "git_commit" (or null),
                    "torch_version", "python_version", "created", "argv", "world_size",
                    "device", "data": {name, num_classes, in_channels, image_size,
                    train_size, test_size, augment, mode, steps_per_epoch, mean, std}}
  metrics.jsonl    one JSON object per epoch (see ``METRIC_KEYS``)
  checkpoint.pt    latest checkpoint (see sparsam.runs.checkpoint), every epoch
  best_model.pt    {"model": state_dict, "epoch", "test_acc"} of the best epoch so far
  summary.json     written when the run finishes: final/best accuracy, timings
  tensorboard/     only with --tensorboard
  debug/           only with SPARSAM_DEBUG_RANK_DUMP=1: each rank's final weights
  .sparsam.lock    while a run uses the directory: the OS lock (see ``lock_dir``)
```

A path given as a run directory is normalised first (``~``, ``..``, symbolic links:
``resolve_dir``), so every check looks at the directory that will be written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from ..train.errors import RunDirError
from . import schema
from .checkpoint import remove_stale_temp_files, write_text

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: no OS lock
    fcntl = None  # type: ignore[assignment]  # no fcntl module off POSIX

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
BEST = "best_model.pt"
SUMMARY = "summary.json"
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, BEST, SUMMARY)
RUN_DIRS = ("tensorboard", "debug")

#: keys of every metrics.jsonl line (mask_* only for SSAM)
METRIC_KEYS = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "epoch_time_s",
    "eval_time_s",
    "time_s",
    "wall_time_s",
    "samples_per_s",
    "steps",
    "train_samples",
)


LOCK_NAMES = {"run": ".sparsam.lock", "sweep": ".sparsam-sweep.lock"}


def resolve_dir(path: str | os.PathLike[str], *, flag: str = "--out") -> Path:
    """``path`` made absolute and normalised (``~``, ``..`` and symbolic links resolved), refusing a
    path that is a file or lies under one ([`RunDirError`][sparsam.train.RunDirError] naming
    ``flag``)."""
    p = Path(path).expanduser().resolve()
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{flag} {path}: {p} is a file, not a directory")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise RunDirError(f"{flag} {path}: {parent} is a file, not a directory")
            break
    return p


class DirLock:
    """An exclusive OS lock (``flock``) on a directory, held until ``release`` or until the
    process ends, also by a crash or ``kill -9``: the OS drops it with the process."""

    def __init__(self, path: Path, lock_file: Path, fd: int | None, created: bool, top: Path | None = None) -> None:
        self.path, self.lock_file, self._fd, self._created = path, lock_file, fd, created
        self._top = top if created and top is not None else path  # the highest folder the lock created

    def release(self) -> None:
        """Give the lock back (removing the lock file, and the directory if this lock created it and
        it holds nothing else, with the parent folders it created for it: a run that failed before
        writing anything leaves nothing behind). Calling it again does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)  # while still locked: see lock_dir
            if self._created and self.path.is_dir() and not any(self.path.iterdir()):
                self.path.rmdir()
                for d in self.path.parents:  # the parents created with it, while empty
                    if not d.is_relative_to(self._top) or any(d.iterdir()):
                        break
                    d.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_dir(path: str | os.PathLike[str], *, kind: str = "run", flag: str = "--out") -> DirLock:
    """Lock the directory ``path`` (created if missing) for one ``kind`` of user: ``"run"`` (a
    training run, [`sparsam.train.train`][sparsam.train.train]) or ``"sweep"`` (a sweep on its root). A
    second lock of the same kind, from another process or this one, raises
    [`RunDirError`][sparsam.train.RunDirError] naming the
    holder's process id. Without ``fcntl`` (not POSIX), or on a filesystem that refuses locks,
    nothing is locked."""
    p = resolve_dir(path, flag=flag)
    created = not p.exists()
    top = p  # the highest folder mkdir creates
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{flag} {path}: cannot create {p} ({e.strerror or e})") from None
    lock_file = p / LOCK_NAMES[kind]
    if fcntl is None:  # pragma: no cover
        return DirLock(p, lock_file, None, created, top)
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a read-only folder or disk: nothing can be written there
            raise RunDirError(f"{flag} {path}: cannot write in {p} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirError(
                f"{p} is in use by another sparsam {kind} (pid {holder}); wait for it to end, or stop it"
            ) from None
        except OSError:  # a filesystem without locks (some network filesystems): go on unlocked
            os.close(fd)
            return DirLock(p, lock_file, None, created, top)
        # The holder removes the file on release: if it was removed (or replaced) between our open
        # and our lock, we locked a file nobody else sees; take the one at the path instead.
        try:
            same = os.stat(lock_file).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return DirLock(p, lock_file, fd, created, top)


def read_run_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``config.json`` of a run directory (the whole file), checked against its schema
    (``sparsam.runs.schema.check_config``: a ``"config"`` object of valid settings); otherwise a
    [`RunDirError`][sparsam.train.RunDirError] names the file and its first bad key."""
    return schema.read_config(Path(path) / CONFIG)


def state(out: str | os.PathLike[str]) -> str:
    """``"empty"`` (no run), ``"started"`` (config.json, no finished summary) or ``"finished"``."""
    out = Path(out)
    summary = out / SUMMARY
    if summary.is_file():
        try:
            if json.loads(summary.read_text()).get("finished"):
                return "finished"
        except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not an object
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
    """The epoch records of a run, every line checked (``sparsam.runs.schema.parse_metrics``): the
    first bad line raises a [`RunDirError`][sparsam.train.RunDirError] naming it. A last line without
    its newline that is not JSON (an append interrupted by a crash, in runs of earlier versions) is
    left out."""
    return schema.read_metrics(Path(out) / METRICS)


def write_metrics(out: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` by ``rows`` atomically (a temporary file renamed into place), so a
    crash or a full disk leaves the old file or the new one, never a shorter one."""
    write_text(Path(out) / METRICS, schema.metrics_text(rows), what="metrics file")


def git_commit() -> tuple[str | None, bool | None]:
    """(commit hash, dirty) of the git checkout holding this package, or (None, None)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = (
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=here,
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout.strip()
            != ""
        )
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
    """Read a run directory back, each file checked against its schema (``sparsam.runs.schema``):
    the first bad line or key raises a [`RunDirError`][sparsam.train.RunDirError] naming its file."""
    p = Path(path)
    meta = read_run_config(p)
    summary = schema.read_summary(p / SUMMARY) if (p / SUMMARY).exists() else None
    return RunRecord(path=p, config=dict(meta["config"]), meta=meta, metrics=read_metrics(p), summary=summary)


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
