"""The run directory's bookkeeping behind one object, so the training loop only trains.

``Run`` opens a run directory (new, ``--resume`` or ``--overwrite``), restores a checkpoint
into the model, optimizer, schedule and scaler, writes ``config.json``, and at the end of every
epoch the metrics line, the best model and the checkpoint; an interrupted epoch is saved as a
partial checkpoint; a finished run gets ``summary.json``. The files are described in
``sparsam.runs.rundir``. Rank 0 writes; every rank holds the same ``Progress``.
"""

from __future__ import annotations

import dataclasses
import platform
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..train import distributed as D
from ..train.config import TrainConfig, diff_identity
from ..train.errors import CheckpointError, ConfigError, RunDirError
from . import rundir
from .checkpoint import (
    load_checkpoint,
    read_torch_file,
    remove_stale_temp_files,
    rng_state,
    save_checkpoint,
    save_torch_file,
    set_rng_state,
    write_json,
)
from .schema import read_summary


@dataclass
class RunResult:
    """What [`train`][sparsam.train.train] returns (rank 0's view; other ranks get the same numbers)."""

    out: str
    epochs_done: int
    finished: bool
    stopped: str | None  # "interrupted" (SIGINT/SIGTERM), "stop_after", or None
    final_test_acc: float | None
    best_test_acc: float | None
    best_epoch: int | None


@dataclass
class Progress:
    """Where the run stands: completed epochs, optimizer steps, the best test accuracy so far, the
    training time of the completed epochs, and (resumed mid-epoch) the interrupted epoch's state."""

    epoch: int = 0
    global_step: int = 0
    best_acc: float = -1.0
    best_epoch: int = 0
    elapsed: float = 0.0
    partial: dict[str, Any] | None = None
    record: dict[str, Any] | None = None  # the metrics line of the last finished epoch


@contextmanager
def locked_run_dir(cfg: TrainConfig, info: D.DistInfo) -> Iterator[None]:
    """Hold the run directory's OS lock for the run's lifetime (rank 0 takes it; every rank learns
    whether it was granted). Temporary files of a write that was killed are removed under it."""
    out = rundir.resolve_dir(cfg.out or cfg.default_out())
    lock, error = None, None
    if info.is_main:
        try:
            lock = rundir.lock_dir(out, kind="run")
        except RunDirError as e:
            error = e
        else:
            remove_stale_temp_files(out, rundir.RUN_FILES)  # nobody else writes here now
    if D.any_rank(error is not None, info):
        raise error or RunDirError(f"{out} is in use by another sparsam run")
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _percent(fraction: float | None) -> str:
    """An accuracy for the console, in percent as in every table and figure."""
    return "—" if fraction is None else f"{100 * fraction:.2f}%"


def _version() -> str:
    from .. import __version__

    return __version__


class Run:
    """One run directory. Build it with ``open``; see the module docstring."""

    def __init__(
        self,
        cfg: TrainConfig,
        info: D.DistInfo,
        *,
        ckpt: dict[str, Any] | None,
        fresh: bool,
        say: Callable[[str], None],
        done: RunResult | None = None,
    ) -> None:
        self.cfg, self.info, self.say = cfg, info, say
        self.out = Path(str(cfg.out))
        self.ckpt = ckpt  # the checkpoint to resume from, if any
        self.fresh = fresh  # remove earlier run files before writing (resume without a checkpoint, --overwrite)
        self.done = done  # set when there is nothing to do (the run already finished)
        self.progress = Progress()
        self._tb: Any = None
        # the checkpoint's full model weights, kept until start() (--fsdp cuts run.ckpt to shards)
        self._best_model: dict[str, Any] | None = ckpt["model"] if ckpt is not None else None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls, cfg: TrainConfig, info: D.DistInfo, *, resume: bool, overwrite: bool, say: Callable[[str], None]
    ) -> Run:
        """Inspect ``cfg.out`` and decide: a new run, a resumed one, or nothing to do (``run.done``).
        Raises RunDirError / CheckpointError / ConfigError for what the user must fix."""
        out = rundir.resolve_dir(cfg.out or cfg.default_out())  # "ghost/../runA" is runA: checked as such
        cfg = dataclasses.replace(cfg, out=str(out))
        ckpt: dict[str, Any] | None = None
        state = rundir.state(out)
        if resume:
            if state == "empty":
                raise RunDirError(
                    f"--resume: {out} holds no run to resume (no {rundir.CONFIG}: a run there, if any, stopped "
                    f"before writing anything); start the run without --resume"
                )
            saved = rundir.read_run_config(out) if (out / rundir.CONFIG).is_file() else {}
            rundir.read_metrics(out)  # checked now, before any work: the first bad line stops here
            diffs = diff_identity(saved["config"], cfg) if saved else []
            if (out / rundir.CHECKPOINT).is_file():
                # Loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
                ckpt = load_checkpoint(out / rundir.CHECKPOINT, map_location="cpu")
                diffs = diffs or diff_identity(ckpt["config"], cfg)
            if diffs:
                raise CheckpointError(
                    f"--resume: the run in {out} was made with a different configuration:\n  "
                    + "\n  ".join(diffs)
                    + "\nResume with the same settings, or start a new run (another --out, or --overwrite)."
                )
            if state == "finished" and ckpt is not None and ckpt["epoch"] >= cfg.epochs:
                summary = read_summary(out / rundir.SUMMARY)
                say(f"{out}: the run already finished ({cfg.epochs} epochs); nothing to do")
                done = RunResult(
                    str(out),
                    cfg.epochs,
                    True,
                    None,
                    summary.get("final_test_acc"),
                    summary.get("best_test_acc"),
                    summary.get("best_epoch"),
                )
                return cls(cfg, info, ckpt=ckpt, fresh=False, say=say, done=done)
            if ckpt is None:
                _refuse_to_clear(out)
                say(f"{out}: no checkpoint yet (the run stopped in its first epoch); starting it from the beginning")
        elif state != "empty" and not overwrite:
            raise RunDirError(
                f"{out} already holds a {state} run ({rundir.CONFIG} exists). Pass --resume to continue it, "
                f"--overwrite to start over, or choose another --out."
            )
        if cfg.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError(
                    "--tensorboard needs the tensorboard package, which is not installed (pip install tensorboard)"
                )
        D.barrier(info)  # every rank has inspected the directory before rank 0 writes to it
        return cls(cfg, info, ckpt=ckpt, fresh=ckpt is None and (overwrite or resume), say=say)

    # ------------------------------------------------------------------ resuming
    def restore(self, model: nn.Module, opt: Any, sched: Any, scaler: Any) -> Progress:
        """Load the checkpoint (if any) into the training objects and the RNGs; returns the progress."""
        ckpt = self.ckpt
        if ckpt is None:
            return self.progress
        try:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {self.out / rundir.CHECKPOINT} does not fit this model/optimizer ({first}); it was left unchanged"
            ) from None
        set_rng_state(ckpt["rng"])
        partial = ckpt.get("partial")
        if int(ckpt.get("world_size", 1)) != self.info.world_size:
            self.say(
                f"warning: the checkpoint was written by {ckpt.get('world_size')} process(es), this run has "
                f"{self.info.world_size}: the run continues, but not bit-exactly as it would have"
            )
        if partial is not None and not self.info.is_main:
            partial = {**partial, "loss_sum": 0.0, "correct": 0, "count": 0}  # rank 0 holds the reduced sums
        self.progress = Progress(
            epoch=int(ckpt["epoch"]),
            global_step=int(ckpt["global_step"]),
            best_acc=float(ckpt["best_acc"]),
            best_epoch=int(ckpt["best_epoch"]),
            elapsed=float(ckpt["elapsed_s"]),
            partial=partial,
            record=ckpt.get("record"),
        )
        p = self.progress
        where = f"epoch {p.epoch}" + (f", step {partial['step_in_epoch']} of epoch {p.epoch + 1}" if partial else "")
        self.say(f"resuming {self.out} from {where}")
        return p

    # ------------------------------------------------------------------ files
    def start(self, *, data: Any, steps_per_epoch: int, argv: list[str] | None) -> None:
        """Write ``config.json`` and an empty ``metrics.jsonl`` (new run), or drop metrics lines written
        after the checkpoint (resumed run); open TensorBoard if asked."""
        out, info = self.out, self.info
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if self.ckpt is None:
                if self.fresh:
                    rundir.clear(out)
                commit, dirty = rundir.git_commit()
                write_json(
                    out / rundir.CONFIG,
                    what="run configuration",
                    obj={
                        "config": self.cfg.to_dict(),
                        "sparsam_version": _version(),
                        "git_commit": commit,
                        "git_dirty": dirty,
                        "torch_version": torch.__version__,
                        "python_version": platform.python_version(),
                        "created": datetime.now(UTC).isoformat(timespec="seconds"),
                        "argv": list(argv) if argv is not None else None,
                        "world_size": info.world_size,
                        "device": str(info.device),
                        "data": {
                            "name": data.name,
                            "num_classes": data.num_classes,
                            "in_channels": data.in_channels,
                            "image_size": list(data.image_size),
                            "train_size": data.train_size,
                            "test_size": data.test_size,
                            "augment": data.augment,
                            "mode": data.mode,
                            "steps_per_epoch": steps_per_epoch,
                            "mean": data.info.get("mean"),
                            "std": data.info.get("std"),
                        },
                    },
                )
                rundir.write_metrics(out, [])
            else:
                self._repair()
            if self.cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out / "tensorboard"))
        D.barrier(info)

    def _repair(self) -> None:
        """Make the run's files agree with the checkpoint it resumes from (rank 0): metrics lines of
        epochs after it are dropped (the old checkpoint order), the checkpoint's own epoch line is
        restored if its write was cut short, and so is the best model when that epoch was the best.
        Every rewrite is atomic."""
        out, p = self.out, self.progress
        rows = rundir.read_metrics(out)
        kept = [r for r in rows if r["epoch"] <= p.epoch]
        record = p.record
        if record is not None and record.get("epoch") == p.epoch and len(kept) == p.epoch - 1:
            kept.append(record)
            self.say(f"{out / rundir.METRICS}: the line of epoch {p.epoch} was restored from the checkpoint")
        if kept != rows:
            rundir.write_metrics(out, kept)
        model = self._best_model
        self._best_model = None
        if model is None or p.best_epoch != p.epoch or p.epoch == 0:
            return
        best = out / rundir.BEST
        try:
            held = read_torch_file(best, what="best model") if best.is_file() else None
        except CheckpointError:
            held = None  # damaged: the checkpoint holds the same weights
        if not (isinstance(held, dict) and held.get("epoch") == p.epoch):
            save_torch_file(best, {"model": model, "epoch": p.epoch, "test_acc": p.best_acc}, what="best model")
            self.say(f"{best}: the best model (epoch {p.epoch}) was restored from the checkpoint")

    def _payload(self, state: dict[str, Any], partial: dict[str, Any] | None) -> dict[str, Any]:
        p = self.progress
        return {
            "epoch": p.epoch,
            "global_step": p.global_step,
            **state,
            "rng": rng_state(),
            "partial": partial,
            "best_acc": p.best_acc,
            "best_epoch": p.best_epoch,
            "elapsed_s": p.elapsed,
            "record": p.record,  # resume restores the metrics line from it if its write was cut short
            "config": self.cfg.to_dict(),
            "version": _version(),
            "world_size": self.info.world_size,
        }

    def save_interrupted(
        self,
        state: Callable[[], dict[str, Any]],
        *,
        step_in_epoch: int,
        steps_per_epoch: int,
        sums: tuple[float, int, int],
        time_s: float,
        lr: float,
    ) -> None:
        """Checkpoint in the middle of an epoch (``state()``: model, optimizer, scheduler, scaler)."""
        if self.info.is_main:
            loss_sum, correct, count = sums
            save_checkpoint(
                self.out / rundir.CHECKPOINT,
                self._payload(
                    state(),
                    {
                        "step_in_epoch": step_in_epoch,
                        "loss_sum": loss_sum,
                        "correct": correct,
                        "count": count,
                        "time_s": time_s,
                        "lr": lr,
                    },
                ),
            )
            self.say(
                f"interrupted in epoch {self.progress.epoch + 1} after step {step_in_epoch}/{steps_per_epoch}; checkpoint "
                f"saved to {self.out / rundir.CHECKPOINT}. Continue with: sparsam train --resume {self.out}"
            )

    def end_epoch(self, record: dict[str, Any], model: nn.Module, state: Callable[[], dict[str, Any]]) -> None:
        """Record a finished epoch (``record["epoch"]`` = epochs done): checkpoint, metrics line
        (plus ``wall_time_s``), best model, TensorBoard.

        The checkpoint comes first and carries the epoch's metrics line: it is the point from which
        ``--resume`` continues, and a resume restores the metrics line and the best model from it when
        a kill or a full disk stopped their writes (``start``). So a run stopped anywhere in here is
        resumable and loses nothing."""
        p = self.progress
        p.epoch = record["epoch"]
        p.elapsed = record["time_s"]
        improved = record["test_acc"] is not None and record["test_acc"] > p.best_acc  # None: not evaluated
        if improved:
            p.best_acc, p.best_epoch = record["test_acc"], p.epoch
        if not self.info.is_main:
            return
        prior = rundir.read_metrics(self.out)
        record["wall_time_s"] = (
            (prior[-1].get("wall_time_s", 0.0) if prior else 0.0) + record["epoch_time_s"] + record["eval_time_s"]
        )
        p.record = dict(record)
        saved = state()
        save_checkpoint(self.out / rundir.CHECKPOINT, self._payload(saved, None))
        rundir.write_metrics(self.out, [*prior, record])
        if improved:
            # saved["model"], not model.state_dict(): under --fsdp it holds the gathered full tensors
            best_state = {"model": saved["model"], "epoch": p.epoch, "test_acc": record["test_acc"]}
            save_torch_file(self.out / rundir.BEST, best_state, what="best model")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch",):
                    self._tb.add_scalar(k, v, p.epoch)
            self._tb.flush()

    def finish(self, *, stopped: str | None, last_test_acc: float | None, steps_per_epoch: int) -> RunResult:
        """Close TensorBoard; for a finished run write ``summary.json``. Returns the result."""
        if self._tb is not None:
            self._tb.close()
        cfg, p, main = self.cfg, self.progress, self.info.is_main
        finished = p.epoch >= cfg.epochs and stopped is None
        rows = rundir.read_metrics(self.out) if main else []
        final_acc = rows[-1]["test_acc"] if rows else last_test_acc
        tested = [r for r in rows if r["test_acc"] is not None]  # --test-epochs skips some epochs
        best = max(tested, key=lambda r: r["test_acc"]) if tested else None
        if finished and main:
            times = sorted(r["epoch_time_s"] for r in rows)
            mid = len(times) // 2
            median = times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])
            write_json(
                self.out / rundir.SUMMARY,
                what="run summary",
                obj={
                    "finished": True,
                    "method": cfg.method,
                    "epochs": cfg.epochs,
                    "final_test_acc": final_acc,
                    "best_test_acc": best["test_acc"] if best else None,
                    "best_epoch": best["epoch"] if best else None,
                    "final_train_loss": rows[-1]["train_loss"] if rows else None,
                    "final_test_loss": rows[-1]["test_loss"] if rows else None,
                    "train_time_s": rows[-1]["time_s"] if rows else None,
                    "epoch_time_s_median": median,
                    "epoch_time_s_mean": sum(times) / len(times),
                    "steps_per_epoch": steps_per_epoch,
                    "time_per_step_s": median / steps_per_epoch,
                    "world_size": self.info.world_size,
                    "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
                },
            )
            self.say(
                f"done: final test accuracy {_percent(final_acc)}, best {_percent(best['test_acc'])} "
                f"(epoch {best['epoch']}); "
                f"{self.out / rundir.SUMMARY}"
                if best
                else "done"
            )
        return RunResult(
            out=str(self.out),
            epochs_done=p.epoch,
            finished=finished,
            stopped=stopped,
            final_test_acc=final_acc,
            best_test_acc=best["test_acc"] if best else (p.best_acc if p.best_acc >= 0 else None),
            best_epoch=best["epoch"] if best else (p.best_epoch or None),
        )


def _refuse_to_clear(out: Path) -> None:
    """A run resumed without a checkpoint starts over, deleting its files: allowed only when they
    hold nothing but the start of a first epoch (config.json, no epoch recorded)."""
    epochs = len(rundir.read_metrics(out))
    kept = [name for name in (rundir.BEST, rundir.SUMMARY) if (out / name).is_file()]
    if epochs or kept:
        held = ", ".join(([f"{epochs} epochs of {rundir.METRICS}"] if epochs else []) + kept)
        raise RunDirError(
            f"--resume: {out} has no {rundir.CHECKPOINT} to resume from but holds {held}; starting over would "
            f"delete them. Restore {rundir.CHECKPOINT}, move the run away, or pass --overwrite to start over"
        )


class EpochMeter:
    """One epoch's training loss and accuracy sums, kept on the device (no host sync per step),
    continued from a partial checkpoint when the run resumes mid-epoch."""

    def __init__(self, device: torch.device, partial: dict[str, Any] | None, lr: float) -> None:
        self.sums = [
            torch.zeros((), dtype=torch.float32, device=device),
            torch.zeros((), dtype=torch.int64, device=device),
        ]
        if partial:
            self.sums[0] += partial["loss_sum"]
            self.sums[1] += partial["correct"]
        self.count = int(partial["count"]) if partial else 0
        self.time_s = float(partial["time_s"]) if partial else 0.0
        self.lr = float(partial["lr"]) if partial else lr
        self.skip = int(partial["step_in_epoch"]) if partial else 0  # batches trained on before the interruption
        self.device = device

    def reduce(self, info: D.DistInfo) -> tuple[float, int, int]:
        """(loss sum, correct, count) over every rank. Host sync."""
        red = torch.stack(
            [
                self.sums[0].double(),
                self.sums[1].double(),
                torch.tensor(float(self.count), dtype=torch.float64, device=self.device),
            ]
        )
        D.all_reduce_sum(red, info)
        loss_sum, correct, total = red.tolist()
        return loss_sum, int(correct), int(total)

    def snapshot(self) -> tuple[Tensor, Tensor, int]:
        return self.sums[0].clone(), self.sums[1].clone(), self.count


__all__ = ["EpochMeter", "Progress", "Run", "RunResult"]
