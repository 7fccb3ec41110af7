"""The training engine: one function, :func:`train`, that reads top to bottom.

    setup (process group, device, run directory) -> data -> model -> optimizer, schedule, scaler
    -> [resume from checkpoint] -> for each epoch: train steps, evaluate, log, checkpoint
    -> summary

One optimizer step (SAM/SSAM), with ``--accum k`` micro-batches in both passes::

    with opt.ascent_pass():                # DDP no_sync for ascent="local"; SSAM's cheaper pass 1
        k x [autocast forward, scaler.scale(loss / k).backward()]     BatchNorm statistics update here
    opt.first_step(zero_grad=True, grad_scaler=scaler)                w -> w + e
    with opt.descent_pass():               # BatchNorm running statistics frozen (clean pass only)
        k x [autocast forward, scaler.scale(loss / k).backward()]     DDP all-reduce on the last one
    opt.second_step(zero_grad=True)        # restore w, [unscale, clip], base step (scaler.step)
    scaler.update(); scheduler.step()

Host synchronisation: none inside a step. The loop reads device values back only where a
comment says so: progress-bar updates every ``--log-every`` steps, the end of an epoch (metrics,
timing) and checkpoints.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as D
from . import rundir
from .checkpoint import atomic_write, load_checkpoint, read_json, rng_state, save_checkpoint, set_rng_state, write_json
from .config import TrainConfig, diff_identity
from .loaders import TrainData, build_data
from .errors import CheckpointError, ConfigError, RunDirError, UserError
from .build import PlainStep, build_optimizer, build_scheduler

DEBUG_DUMP_ENV = "SPARSAM_DEBUG_RANK_DUMP"


@dataclass
class RunResult:
    """What :func:`train` returns (rank 0's view; other ranks get the same numbers)."""

    out: str
    epochs_done: int
    finished: bool
    stopped: str | None  # "interrupted" (SIGINT/SIGTERM), "stop_after", or None
    final_test_acc: float | None
    best_test_acc: float | None
    best_epoch: int | None


class StopFlag:
    """SIGINT / SIGTERM set a flag that the loop reads between steps, so a checkpoint is written
    at a consistent point (never between the two SAM passes). A second Ctrl-C aborts at once."""

    def __init__(self, announce: Callable[[str], None]) -> None:
        self.requested = False
        self._announce = announce
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._announce(
            f"\n{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to abort without saving)"
        )

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod  # type: ignore[assignment]
    return model


def _version() -> str:
    from .. import __version__

    return __version__


def _amp_dtype(amp: str) -> torch.dtype | None:
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
    argv: list[str] | None = None,
) -> RunResult:
    """Train as ``cfg`` says, writing the run directory ``cfg.out`` (see :mod:`sparsam.train.rundir`).

    Args:
        cfg: a validated configuration (:func:`sparsam.train.config.build_config`).
        resume: continue the run in ``cfg.out`` from its checkpoint; its saved config must agree
            with ``cfg`` on every identity key (run-control keys may differ).
        overwrite: start over in a directory that already holds a run (its run files are removed).
        quiet: no per-epoch lines and no progress bar.
        on_step: called with the global step count after every optimizer step (tests, hooks).
        argv: the command line, recorded in ``config.json``.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; rank 0 writes the files.
    Raises :class:`UserError` subclasses for problems the user can fix.
    """
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    info = D.setup(cfg.device)
    try:
        return _train(cfg, info, resume=resume, overwrite=overwrite, quiet=quiet, on_step=on_step, argv=argv)
    finally:
        D.teardown(info)
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    info: D.DistInfo,
    *,
    resume: bool,
    overwrite: bool,
    quiet: bool,
    on_step: Callable[[int], None] | None,
    argv: list[str] | None,
) -> RunResult:
    device, main = info.device, info.is_main

    def say(msg: str) -> None:
        if main and not quiet:
            print(msg, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ run directory
    out = Path(cfg.out or cfg.default_out()).expanduser().absolute()
    cfg = dataclasses.replace(cfg, out=str(out))
    ckpt: dict[str, Any] | None = None
    run_state = rundir.state(out)
    if resume:
        if run_state == "empty":
            raise RunDirError(f"--resume: {out} holds no run to resume (no {rundir.CONFIG})")
        saved = read_json(out / rundir.CONFIG) if (out / rundir.CONFIG).is_file() else {}
        diffs = diff_identity(saved.get("config", {}), cfg) if saved else []
        if (out / rundir.CHECKPOINT).is_file():
            # Loaded on the CPU: RNG states must stay CPU tensors; load_state_dict moves the rest.
            ckpt = load_checkpoint(out / rundir.CHECKPOINT, map_location="cpu")
            diffs = diffs or diff_identity(ckpt["config"], cfg)
        if diffs:
            raise CheckpointError(
                f"--resume: the run in {out} was made with a different configuration:\n  " + "\n  ".join(diffs)
                + "\nResume with the same settings, or start a new run (another --out, or --overwrite)."
            )
        if run_state == "finished" and ckpt is not None and ckpt["epoch"] >= cfg.epochs:
            summary = read_json(out / rundir.SUMMARY)
            say(f"{out}: the run already finished ({cfg.epochs} epochs); nothing to do")
            return RunResult(str(out), cfg.epochs, True, None, summary.get("final_test_acc"),
                             summary.get("best_test_acc"), summary.get("best_epoch"))
        if ckpt is None:
            say(f"{out}: no checkpoint yet (the run stopped in its first epoch); starting it from the beginning")
    elif run_state != "empty" and not overwrite:
        raise RunDirError(
            f"{out} already holds a {run_state} run ({rundir.CONFIG} exists). Pass --resume to continue it, "
            f"--overwrite to start over, or choose another --out."
        )
    if cfg.tensorboard:
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise ConfigError("--tensorboard needs the tensorboard package, which is not installed (pip install tensorboard)")
    D.barrier(info)  # every rank has inspected the directory before rank 0 writes to it

    # ------------------------------------------------------------------ data
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({info.world_size})")
    batch_per_rank = cfg.batch_size // info.world_size
    if batch_per_rank % cfg.accum:
        raise ConfigError(f"the per-process batch ({batch_per_rank}) must be divisible by --accum ({cfg.accum})")
    try:
        data: TrainData = build_data(cfg, device=device, rank=info.rank, world_size=info.world_size,
                                     batch_per_rank=batch_per_rank)
    except UserError:
        raise
    except (ValueError, OSError, ImportError) as e:  # missing files, bad folders, unknown names
        if cfg.download and cfg.data in ("cifar10", "cifar100") and isinstance(e, OSError):
            from ..data.cifar import RELEASES, default_root

            rel = RELEASES[cfg.data]
            root = Path(cfg.data_root or default_root()).absolute()
            raise UserError(
                f"--data {cfg.data} --download failed ({e}). Offline? Fetch {rel.url} (MD5 {rel.md5}) elsewhere "
                f"and put {rel.archive} in {root} (it is checked and extracted on the next run), or set --data-root."
            ) from e
        raise UserError(f"--data {cfg.data}: {e}") from e
    steps_per_epoch = len(data.train)
    total_steps = cfg.epochs * steps_per_epoch

    # ------------------------------------------------------------------ model
    from ..models import create_model

    try:
        model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--model {cfg.model!r} --width {cfg.width}: {e}") from None
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    raw_model = model
    wrapped: nn.Module = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward_model: Any = torch.compile(wrapped) if cfg.compile else wrapped
    ddp = wrapped if info.enabled else None

    # ------------------------------------------------------------------ loss, optimizer, schedule, scaler
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    try:
        opt, base_opt = build_optimizer(
            cfg, raw_model.parameters(), model=wrapped, loss_fn=criterion, fisher_data=data.fisher,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        )
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # the optimizer and mask classes validate their arguments
        raise ConfigError(f"cannot build --opt {cfg.opt}: {e}") from e
    sam = opt is not base_opt
    sched = build_scheduler(cfg, base_opt, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = _amp_dtype(cfg.amp)

    def autocast() -> Any:
        return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()

    # ------------------------------------------------------------------ resume
    start_epoch, global_step, best_acc, best_epoch, elapsed = 0, 0, -1.0, 0, 0.0
    partial: dict[str, Any] | None = None
    if ckpt is not None:
        try:
            raw_model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") is not None:
                scaler.load_state_dict(ckpt["scaler"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0]
            raise CheckpointError(
                f"checkpoint {out / rundir.CHECKPOINT} does not fit this model/optimizer ({first}); it was left unchanged"
            ) from None
        set_rng_state(ckpt["rng"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
        best_acc, best_epoch, elapsed = float(ckpt["best_acc"]), int(ckpt["best_epoch"]), float(ckpt["elapsed_s"])
        partial = ckpt.get("partial")
        if int(ckpt.get("world_size", 1)) != info.world_size:
            say(f"warning: the checkpoint was written by {ckpt.get('world_size')} process(es), this run has "
                f"{info.world_size}: the run continues, but not bit-exactly as it would have")
        if partial is not None and not main:
            partial = {**partial, "loss_sum": 0.0, "correct": 0, "count": 0}  # rank 0 holds the reduced sums
        where = f"epoch {start_epoch}" + (f", step {partial['step_in_epoch']} of epoch {start_epoch + 1}" if partial else "")
        say(f"resuming {out} from {where}")

    # ------------------------------------------------------------------ run files (rank 0)
    metrics_path = out / rundir.METRICS
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:
            if overwrite or resume:
                rundir.clear(out)
            commit, dirty = rundir.git_commit()
            write_json(out / rundir.CONFIG, {
                "config": cfg.to_dict(),
                "sparsam_version": _version(),
                "git_commit": commit,
                "git_dirty": dirty,
                "torch_version": torch.__version__,
                "python_version": platform.python_version(),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "argv": list(argv) if argv is not None else None,
                "world_size": info.world_size,
                "device": str(device),
                "data": {
                    "name": data.name, "num_classes": data.num_classes, "in_channels": data.in_channels,
                    "image_size": list(data.image_size), "train_size": data.train_size, "test_size": data.test_size,
                    "augment": data.augment, "mode": data.mode, "steps_per_epoch": steps_per_epoch,
                    "mean": data.info.get("mean"), "std": data.info.get("std"),
                },
            })
            metrics_path.write_text("")
        else:  # drop epoch lines written after the checkpoint (a crash between the two writes)
            kept = [r for r in rundir.read_metrics(out) if r.get("epoch", 0) <= start_epoch]
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tb = None
    if cfg.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))
    D.barrier(info)

    # ------------------------------------------------------------------ one optimizer step
    stepper: Any = opt if sam else PlainStep(opt, max_grad_norm=cfg.clip)

    def step(x: Tensor, y: Tensor, stats: list[Tensor]) -> int:
        """One optimizer step on the batch (x, y); adds the clean pass's loss sum and correct count
        to ``stats`` and returns the number of samples it saw."""
        seen = [0]

        def closure() -> None:
            # Called by the optimizer once per pass. Micro-batches: DDP all-reduces in the last one only
            # (and not at all in SAM's ascent pass with ascent="local": ascent_pass() wraps it in no_sync).
            clean = stepper.current_pass != "descent"
            n = x.shape[0] if stepper.batch_fraction >= 1 else math.ceil(stepper.batch_fraction * x.shape[0])
            xs, ys = (x[:n].chunk(cfg.accum), y[:n].chunk(cfg.accum)) if cfg.accum > 1 else ((x[:n],), (y[:n],))
            for j, (xb, yb) in enumerate(zip(xs, ys)):
                with ddp.no_sync() if ddp is not None and j < len(xs) - 1 else nullcontext():  # type: ignore[operator]
                    with autocast():
                        logits = forward_model(xb)
                        loss = criterion(logits, yb)
                    scaler.scale(loss / len(xs)).backward()
                if clean:
                    stats[0] += loss.detach().float() * yb.shape[0]
                    stats[1] += (logits.detach().argmax(1) == yb).sum()
                    seen[0] += yb.shape[0]

        stepper.step(closure, grad_scaler=scaler)
        opt.zero_grad(set_to_none=True)
        scaler.update()  # on-device scale update; under fp16 scaler.step above syncs once, as for any optimizer
        sched.step()
        return seen[0]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate() -> tuple[float, float]:
        raw_model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        for x, y in data.test:
            with autocast():
                logits = raw_model(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(1) == y).sum()
            sums[2] += y.shape[0]
        D.all_reduce_sum(sums, info)
        loss_sum, correct, count = sums.tolist()  # host sync: once per evaluation
        raw_model.train()
        return loss_sum / count, correct / count

    def mask_snapshot() -> dict[str, Tensor] | None:
        if not hasattr(opt, "masks"):
            return None
        names = opt.param_names()  # type: ignore[attr-defined]
        current = opt.masks  # type: ignore[attr-defined]
        return {names[p]: current.get(names[p], torch.zeros(p.shape, dtype=torch.bool, device=p.device)).detach().cpu().clone()
                for g in opt.param_groups if g["rho"] > 0 for p in g["params"] if p.requires_grad}

    def checkpoint_payload(epoch: int, partial_state: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "epoch": epoch, "global_step": global_step, "model": raw_model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng": rng_state(),
            "partial": partial_state, "best_acc": best_acc, "best_epoch": best_epoch, "elapsed_s": elapsed,
            "config": cfg.to_dict(), "version": _version(), "world_size": info.world_size,
        }

    # ------------------------------------------------------------------ the loop
    bar_enabled = main and not quiet and cfg.progress and sys.stderr.isatty()
    tqdm_cls = None
    if bar_enabled:
        try:
            from tqdm.auto import tqdm as tqdm_cls
        except ImportError:
            bar_enabled = False
    previous_masks = mask_snapshot() if ckpt is not None else None
    stopped: str | None = None
    epochs_this_call = 0
    samples_seen = 0
    last_test_acc: float | None = None
    epoch = start_epoch
    raw_model.train()
    say(f"training {cfg.method} on {data.name} ({data.train_size} train / {data.test_size} test images), "
        f"{cfg.model}, {cfg.epochs} epochs x {steps_per_epoch} steps, {info.world_size} process(es) on {device}; "
        f"run directory {out}")
    with StopFlag(say) as stop:
        while epoch < cfg.epochs:
            data.train.set_epoch(epoch)
            if data.fisher is not None:
                data.fisher.set_epoch(epoch)
            skip = int(partial["step_in_epoch"]) if partial else 0
            sums = [torch.zeros((), dtype=torch.float32, device=device), torch.zeros((), dtype=torch.int64, device=device)]
            if partial:
                sums[0] += partial["loss_sum"]
                sums[1] += partial["correct"]
            count = int(partial["count"]) if partial else 0
            epoch_time = float(partial["time_s"]) if partial else 0.0
            epoch_lr = float(partial["lr"]) if partial else base_opt.param_groups[0]["lr"]
            partial = None
            bar = tqdm_cls(total=steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                           dynamic_ncols=True) if bar_enabled and tqdm_cls is not None else None
            t0 = time.perf_counter()
            window = [sums[0].clone(), sums[1].clone(), count, t0]
            interrupted_at: int | None = None
            for i, (x, y) in enumerate(data.train):
                if i < skip:
                    continue  # resumed mid-epoch: these batches were trained on before the interruption
                count += step(x, y, sums)
                global_step += 1
                if on_step is not None:
                    on_step(global_step)
                at_log = (i + 1) % cfg.log_every == 0
                if bar is not None and at_log:
                    # host sync: progress-bar values, every --log-every steps
                    n = count - window[2]
                    now = time.perf_counter()
                    bar.set_postfix(loss=f"{(sums[0] - window[0]).item() / n:.4f}",
                                    acc=f"{(sums[1] - window[1]).item() / n:.3f}",
                                    img_s=f"{n * info.world_size / (now - window[3]):.0f}")
                    window = [sums[0].clone(), sums[1].clone(), count, now]
                if bar is not None:
                    bar.update(1)
                # Ranks agree on stopping at log points (one tiny all-reduce); alone, after any step.
                if (stop.requested if not info.enabled else (at_log and D.any_rank(stop.requested, info))):
                    if i + 1 < steps_per_epoch:
                        interrupted_at = i + 1
                    break
            if bar is not None:
                bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # host sync: the epoch's kernels must finish before timing it
            epoch_time += time.perf_counter() - t0
            samples_seen += count
            if interrupted_at is not None:
                red = torch.stack([sums[0].double(), sums[1].double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
                D.all_reduce_sum(red, info)
                loss_sum, correct, total = red.tolist()  # host sync: saving the interrupted epoch
                # elapsed stays at the last full epoch; the partial epoch's time travels in "partial"
                if main:
                    save_checkpoint(out / rundir.CHECKPOINT, checkpoint_payload(epoch, {
                        "step_in_epoch": interrupted_at, "loss_sum": loss_sum, "correct": int(correct),
                        "count": int(total), "time_s": epoch_time, "lr": epoch_lr,
                    }))
                    say(f"interrupted in epoch {epoch + 1} after step {interrupted_at}/{steps_per_epoch}; checkpoint saved "
                        f"to {out / rundir.CHECKPOINT}. Continue with: sparsam train --resume {out}")
                stopped = "interrupted"
                break
            # ---------------------------------------------------------- end of epoch
            red = torch.stack([sums[0].double(), sums[1].double(), torch.tensor(float(count), dtype=torch.float64, device=device)])
            D.all_reduce_sum(red, info)
            loss_sum, correct, total = red.tolist()  # host sync: epoch metrics
            elapsed += epoch_time
            D.broadcast_buffers(raw_model, info)  # every rank evaluates and ends with rank 0's BN statistics
            t_eval = time.perf_counter()
            test_loss, test_acc = evaluate()
            eval_time = time.perf_counter() - t_eval
            epoch += 1
            epochs_this_call += 1
            last_test_acc = test_acc
            if test_acc > best_acc:
                best_acc, best_epoch = test_acc, epoch
                if main:
                    best_state = {"model": raw_model.state_dict(), "epoch": epoch, "test_acc": test_acc}
                    atomic_write(out / rundir.BEST, lambda f: torch.save(best_state, f))
            record: dict[str, Any] = {
                "epoch": epoch, "step": global_step, "lr": epoch_lr,
                "train_loss": loss_sum / total, "train_acc": correct / total,
                "test_loss": test_loss, "test_acc": test_acc,
                "epoch_time_s": epoch_time, "eval_time_s": eval_time, "time_s": elapsed,
                "samples_per_s": total / epoch_time if epoch_time > 0 else None, "steps": steps_per_epoch,
                "train_samples": int(total),
            }
            snap = mask_snapshot()
            if snap is not None:
                from ..masks import mask_stats

                ms = mask_stats(snap, previous_masks)  # host syncs: mask statistics, once per epoch
                record.update({"mask_density": ms["density"], "mask_perturbed": ms["perturbed"]})
                if previous_masks is not None:
                    record.update({"mask_overlap": ms["overlap"], "mask_jaccard": ms["jaccard"],
                                   "mask_changed": ms["changed"]})
                previous_masks = snap
            if main:
                prior = rundir.read_metrics(out)
                record["wall_time_s"] = (prior[-1].get("wall_time_s", 0.0) if prior else 0.0) + epoch_time + eval_time
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                save_checkpoint(out / rundir.CHECKPOINT, checkpoint_payload(epoch, None))
                if tb is not None:
                    for k, v in record.items():
                        if isinstance(v, (int, float)) and k not in ("epoch",):
                            tb.add_scalar(k, v, epoch)
                    tb.flush()
            say(f"epoch {epoch}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}  "
                f"test_loss {test_loss:.4f}  test_acc {test_acc:.4f}  ({epoch_time:.1f} s"
                + (f", mask density {record['mask_density']:.3f}" if "mask_density" in record else "") + ")")
            if not math.isfinite(record["train_loss"]):
                say("warning: the training loss is not finite")
            stop_now = D.any_rank(stop.requested, info)
            if stop_now and epoch < cfg.epochs:
                say(f"stopped after epoch {epoch}; checkpoint saved. Continue with: sparsam train --resume {out}")
                stopped = "interrupted"
                break
            if cfg.stop_after is not None and epochs_this_call >= cfg.stop_after and epoch < cfg.epochs:
                say(f"stopping after {epochs_this_call} epoch(s) as asked (--stop-after); continue with --resume")
                stopped = "stop_after"
                break
    if tb is not None:
        tb.close()

    # ------------------------------------------------------------------ debug dump and summary
    if os.environ.get(DEBUG_DUMP_ENV):
        shard_epoch0 = None
        if hasattr(data.train, "indices"):  # which training samples this rank drew in epoch 0
            data.train.set_epoch(0)
            shard_epoch0 = data.train.indices()
        (out / "debug").mkdir(parents=True, exist_ok=True)
        torch.save({"model": {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                    "digest": _weights_digest(raw_model), "rank": info.rank, "world_size": info.world_size,
                    "samples_seen": samples_seen, "epoch": epoch, "shard_epoch0": shard_epoch0,
                    "masks": {k: v.cpu() for k, v in opt.masks.items()} if hasattr(opt, "masks") else None},
                   out / "debug" / f"rank{info.rank}.pt")
    finished = epoch >= cfg.epochs and stopped is None
    rows = rundir.read_metrics(out) if main else []
    final_acc = rows[-1]["test_acc"] if rows else last_test_acc
    best = max(rows, key=lambda r: r["test_acc"]) if rows else None
    if finished and main:
        times = sorted(r["epoch_time_s"] for r in rows)
        median = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
        write_json(out / rundir.SUMMARY, {
            "finished": True, "method": cfg.method, "epochs": cfg.epochs,
            "final_test_acc": final_acc, "best_test_acc": best["test_acc"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "final_train_loss": rows[-1]["train_loss"] if rows else None,
            "final_test_loss": rows[-1]["test_loss"] if rows else None,
            "train_time_s": rows[-1]["time_s"] if rows else None,
            "epoch_time_s_median": median, "epoch_time_s_mean": sum(times) / len(times),
            "steps_per_epoch": steps_per_epoch, "time_per_step_s": median / steps_per_epoch,
            "world_size": info.world_size,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })
        say(f"done: final test accuracy {final_acc:.4f}, best {best['test_acc']:.4f} (epoch {best['epoch']}); "
            f"{out / rundir.SUMMARY}" if best else "done")
    return RunResult(
        out=str(out), epochs_done=epoch, finished=finished, stopped=stopped, final_test_acc=final_acc,
        best_test_acc=best["test_acc"] if best else (best_acc if best_acc >= 0 else None),
        best_epoch=best["epoch"] if best else (best_epoch or None),
    )


__all__ = ["RunResult", "StopFlag", "train"]
