"""The training engine: [`train`][sparsam.train.train], a loop that reads top to bottom.

    open the run directory -> data -> model -> optimizer, schedule, scaler -> [restore checkpoint]
    -> for each epoch: train steps, evaluate, record (metrics, best model, checkpoint) -> summary

The run directory's bookkeeping lives in ``sparsam.runs.run.Run``; one step on a batch is
``TrainStep``'s: ``opt.step(closure)`` calls its closure once per pass (twice for SAM/SSAM,
see ``docs/design.md``), which runs the ``--accum`` micro-batches under autocast, scales
the loss for the GradScaler, lets DDP all-reduce on the last micro-batch only, and adds the
loss and accuracy of the clean pass (``opt.current_pass != "descent"``) to the epoch's sums.

Host synchronisation: none inside a step. The loop reads device values back only where a
comment says so: progress-bar updates every ``--log-every`` steps, the end of an epoch (metrics,
timing) and checkpoints.
"""

from __future__ import annotations

import functools
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _sharded
from ..optim.passes import ASCENT, MEASURE, pass_batch, pass_loss
from ..optim.plain import PlainStep
from ..optim.sam import SAM
from ..runs.run import EpochMeter, Run, RunResult, locked_run_dir
from . import distributed as D
from . import sharding
from .build import build_optimizer_and_base, build_scheduler
from .config import TrainConfig, test_epochs
from .errors import ConfigError, UserError
from .loaders import TrainData, batch_per_rank, build_data

DEBUG_DUMP_ENV = "SPARSAM_DEBUG_RANK_DUMP"


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = False,
    on_step: Callable[[int], None] | None = None,
    argv: list[str] | None = None,
) -> RunResult:
    """Train as ``cfg`` says, writing the run directory ``cfg.out`` (see ``sparsam.runs.rundir``).

    Args:
        cfg: a validated configuration
            ([`sparsam.train.config.build_config`][sparsam.train.build_config]).
        resume: continue the run in ``cfg.out`` from its checkpoint; its saved config must agree
            with ``cfg`` on every identity key (run-control keys may differ).
        overwrite: start over in a directory that already holds a run (its run files are removed).
        quiet: no per-epoch lines and no progress bar.
        on_step: called with the global step count after every optimizer step (tests, hooks).
        argv: the command line, recorded in ``config.json``.

    Under torchrun (``WORLD_SIZE`` > 1) every process calls this; rank 0 writes the files.
    Raises [`UserError`][sparsam.train.UserError] subclasses for problems the user can fix.
    """
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    info = D.setup(cfg.device)
    restore_sigterm = _abort_on_sigterm()
    try:
        with locked_run_dir(cfg, info):  # an OS lock on the run directory for the run's lifetime
            return _train(cfg, info, resume=resume, overwrite=overwrite, quiet=quiet, on_step=on_step, argv=argv)
    finally:
        restore_sigterm()
        D.teardown(info)
        torch.set_num_threads(threads)


def _abort_on_sigterm() -> Callable[[], Any]:
    """Until the training loop takes over the signals (``StopFlag``), SIGTERM aborts like Ctrl-C
    (KeyboardInterrupt) instead of ending the process on the spot, so a run stopped while it starts
    (loading data, building the model) releases its lock and removes the run directory it created
    but had not written to yet. Returns what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def abort(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, abort)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


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
    device = info.device
    say = functools.partial(_say, info.is_main and not quiet)
    run = Run.open(cfg, info, resume=resume, overwrite=overwrite, say=say)
    if run.done is not None:
        return run.done
    cfg = run.cfg

    # ------------------------------------------------------------------ data, model, optimizer
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    data = _data(cfg, info)
    steps_per_epoch = len(data.train)
    if cfg.fsdp and not info.enabled:
        say("--fsdp with one process: nothing to shard, the model is trained unsharded")
    model, ddp, forward_model = _model(cfg, data, info)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    opt, base_opt = _optimizer(cfg, model, ddp, criterion, data, steps_per_epoch)
    sched = build_scheduler(cfg, base_opt, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    sharded = cfg.fsdp and info.enabled
    if sharded and run.ckpt is not None:  # full tensors in the file: cut to this rank's shards
        run.ckpt = sharding.shard_checkpoint(run.ckpt, model, opt)
    progress = run.restore(model, opt, sched, scaler)
    step = TrainStep(
        cfg,
        device,
        model=model,
        ddp=ddp,
        forward_model=forward_model,
        opt=opt,
        sched=sched,
        scaler=scaler,
        criterion=criterion,
        compute=progress.global_step,
        sharded=sharded,
    )
    run.start(data=data, steps_per_epoch=steps_per_epoch, argv=argv)

    # ------------------------------------------------------------------ the loop
    masks = _MaskStats(opt, resumed=run.ckpt is not None)
    bar = _Bar(
        enabled=info.is_main and not quiet and cfg.progress and sys.stderr.isatty(),
        epochs=cfg.epochs,
        steps=steps_per_epoch,
        log_every=cfg.log_every,
        world_size=info.world_size,
    )
    stopped: str | None = None
    epochs_this_call, samples_seen, last_test_acc = 0, 0, None
    eval_at = test_epochs(cfg)  # epochs evaluated on the test set (None: every epoch)
    model.train()
    say(
        f"training {cfg.method} on {data.name} ({data.train_size} train / {data.test_size} test images), "
        f"{cfg.model}, {cfg.epochs} epochs x {steps_per_epoch} steps, {info.world_size} process(es) on {device}"
        f"{' with parameters sharded by FSDP2' if any(map(_sharded.is_sharded, model.parameters())) else ''}; "
        f"run directory {run.out}"
    )
    with StopFlag(say) as stop:
        while progress.epoch < cfg.epochs:
            data.train.set_epoch(progress.epoch)
            if data.fisher is not None:
                data.fisher.set_epoch(progress.epoch)
            meter = EpochMeter(device, progress.partial, lr=base_opt.param_groups[0]["lr"])
            progress.partial = None
            bar.start(progress.epoch, meter)
            t0 = time.perf_counter()
            interrupted_at: int | None = None
            for i, (x, y) in enumerate(data.train):
                if i < meter.skip:
                    continue  # resumed mid-epoch: these batches were trained on before the interruption
                meter.count += step(x, y, meter.sums)
                progress.global_step += 1
                if on_step is not None:
                    on_step(progress.global_step)
                at_log = (i + 1) % cfg.log_every == 0
                bar.update(meter, at_log)
                # Ranks agree on stopping at log points (one tiny all-reduce); alone, after any step.
                if stop.requested if not info.enabled else (at_log and D.any_rank(stop.requested, info)):
                    interrupted_at = i + 1 if i + 1 < steps_per_epoch else None
                    break
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # host sync: the epoch's kernels must finish before timing it
            meter.time_s += time.perf_counter() - t0
            samples_seen += meter.count
            if interrupted_at is not None:  # the partial epoch's time travels in the checkpoint's "partial"
                run.save_interrupted(
                    step.saved_state(),
                    step_in_epoch=interrupted_at,
                    steps_per_epoch=steps_per_epoch,
                    sums=meter.reduce(info),
                    time_s=meter.time_s,
                    lr=meter.lr,
                )  # host sync
                stopped = "interrupted"
                break
            # ---------------------------------------------------------- end of epoch
            sums = meter.reduce(info)  # host sync: epoch metrics
            D.broadcast_buffers(model, info)  # every rank evaluates and ends with rank 0's BN statistics
            t_eval = time.perf_counter()
            test: tuple[float, float] | None = None
            if eval_at is None or progress.epoch + 1 in eval_at:  # --test-epochs: else recorded as null
                test = evaluate(model, data.test, step.autocast, info, sharded=sharded)
                last_test_acc = test[1]
            eval_time = time.perf_counter() - t_eval
            epochs_this_call += 1
            record = _epoch_record(progress, meter, sums, test, eval_time, steps_per_epoch, masks, step.compute)
            run.end_epoch(record, model, step.saved_state())
            say(_epoch_line(record, progress.epoch, cfg.epochs, meter.time_s))
            if not math.isfinite(record["train_loss"]):
                say("warning: the training loss is not finite")
            if D.any_rank(stop.requested, info) and progress.epoch < cfg.epochs:
                say(
                    f"stopped after epoch {progress.epoch}; checkpoint saved. Continue with: sparsam train --resume {run.out}"
                )
                stopped = "interrupted"
                break
            if cfg.stop_after is not None and epochs_this_call >= cfg.stop_after and progress.epoch < cfg.epochs:
                say(f"stopping after {epochs_this_call} epoch(s) as asked (--stop-after); continue with --resume")
                stopped = "stop_after"
                break

    if os.environ.get(DEBUG_DUMP_ENV):  # tests/test_train_ddp.py: each rank's final state
        D.dump_rank_state(
            run.out / "debug",
            info,
            model=model,
            opt=opt,
            train_loader=data.train,
            samples_seen=samples_seen,
            epoch=progress.epoch,
        )
    return run.finish(stopped=stopped, last_test_acc=last_test_acc, steps_per_epoch=steps_per_epoch)


class TrainStep:
    """One optimizer step on a batch: ``step(x, y, sums)`` returns the number of samples of the
    clean pass, whose loss sum and correct count it adds to ``sums``.

    The optimizer calls ``_pass`` once per pass (twice for SAM/SSAM, see ``docs/design.md``): it runs
    the ``--accum`` micro-batches under autocast, scales the loss for the GradScaler, lets DDP
    all-reduce on the last micro-batch only, and counts the clean pass (``current_pass`` ``None`` or
    ascent). Then the gradients are cleared, the scaler updated and the LR schedule stepped.
    ``saved_state`` is what a checkpoint holds."""

    def __init__(
        self,
        cfg: TrainConfig,
        device: torch.device,
        *,
        model: nn.Module,
        ddp: Any,
        forward_model: Any,
        opt: Any,
        sched: Any,
        scaler: torch.amp.GradScaler,
        criterion: nn.Module,
        compute: float,
        sharded: bool,
    ) -> None:
        self.model, self.ddp, self.forward_model = model, ddp, forward_model
        self.opt, self.sched, self.scaler, self.sharded = opt, sched, scaler, sharded
        self.accum = cfg.accum
        self.criterion = criterion
        self.sample_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="none")
        self.device_type = device.type
        self.amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
        # --opt sgd: the plain step drives the optimizer; its compute so far is one pass per step taken
        self.stepper: Any = opt if isinstance(opt, SAM) else PlainStep(opt, max_grad_norm=cfg.clip, compute=compute)
        self._batch: tuple[Tensor, Tensor, list[Tensor]] | None = None
        self._seen = 0

    @property
    def compute(self) -> float:
        """Training compute so far in SGD-step equivalents (forward+backward passes, counted by the optimizer)."""
        compute: float = self.stepper.compute
        return compute

    def autocast(self) -> Any:
        return torch.autocast(self.device_type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()

    def __call__(self, x: Tensor, y: Tensor, sums: list[Tensor]) -> int:
        self._batch, self._seen = (x, y, sums), 0
        try:
            self.stepper.step(self._pass, grad_scaler=self.scaler)
        finally:
            self._batch = None
        self.opt.zero_grad(set_to_none=True)
        self.scaler.update()  # on-device scale update; under fp16 scaler.step above syncs once, as for any optimizer
        self.sched.step()
        return self._seen

    def _pass(self) -> None:  # the closure: the optimizer calls it once per pass
        assert self._batch is not None
        x, y, sums = self._batch
        stepper, ddp = self.stepper, self.ddp
        kind = stepper.current_pass
        clean = kind in (None, ASCENT)
        # This pass's samples (ESAM's data selection, a sub-batch ascent): the closure contract's helpers
        xa, ya = pass_batch(stepper, (x, y))
        xs, ys = (xa.chunk(self.accum), ya.chunk(self.accum)) if self.accum > 1 else ((xa,), (ya,))
        per_sample = stepper.wants_sample_losses  # ESAM: the losses of each sample, recorded by pass_loss
        for j, (xb, yb) in enumerate(zip(xs, ys)):
            if kind == MEASURE:  # ESAM: forward only at w + e (under no_grad), per-sample losses
                with self.autocast():
                    pass_loss(stepper, self.sample_loss(self.forward_model(xb).float(), yb))
                continue
            # DDP all-reduces in the last micro-batch only (SAM's local ascent: not at all, see ascent_pass)
            with ddp.no_sync() if ddp is not None and j < len(xs) - 1 else nullcontext():
                with self.autocast():
                    logits = self.forward_model(xb)
                    loss = pass_loss(
                        stepper, self.sample_loss(logits, yb) if per_sample else self.criterion(logits, yb)
                    )
                self.scaler.scale(loss / len(xs)).backward()
            if clean:
                sums[0] += loss.detach().float() * yb.shape[0]
                sums[1] += (logits.detach().argmax(1) == yb).sum()
                self._seen += yb.shape[0]

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def saved_state(self) -> Callable[[], dict[str, Any]]:
        """What rank 0 saves. Under --fsdp every rank gathers the full tensors now (a collective)."""
        if not self.sharded:
            return self.state
        snapshot = sharding.full_state(self.state())
        return lambda: snapshot


def _say(enabled: bool, msg: str) -> None:
    if enabled:
        print(msg, file=sys.stderr, flush=True)


def _optimizer(
    cfg: TrainConfig, model: nn.Module, ddp: Any, criterion: nn.Module, data: TrainData, steps_per_epoch: int
) -> tuple[Any, Any]:
    """(optimizer to step, base optimizer the schedule drives); the classes' own argument errors as ConfigError."""
    try:  # SAM/SSAM get the DDP wrapper (no_sync, BatchNorm, names), never the torch.compile one
        return build_optimizer_and_base(
            cfg,
            model.parameters(),
            model=ddp or model,
            loss_fn=criterion,
            fisher_data=data.fisher,
            steps_per_epoch=steps_per_epoch,
            total_steps=cfg.epochs * steps_per_epoch,
        )
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # the optimizer and mask classes validate their arguments
        raise ConfigError(f"cannot build --opt {cfg.opt}: {e}") from e


def _epoch_record(
    progress: Any,
    meter: EpochMeter,
    sums: tuple[float, float, int],
    test: tuple[float, float] | None,
    eval_time: float,
    steps_per_epoch: int,
    masks: _MaskStats,
    compute: float,
) -> dict[str, Any]:
    """The epoch's line of metrics.jsonl (``progress`` before ``Run.end_epoch`` counts the epoch)."""
    loss_sum, correct, total = sums
    test_loss, test_acc = test if test is not None else (None, None)
    return {
        "epoch": progress.epoch + 1,
        "step": progress.global_step,
        "lr": meter.lr,
        "train_loss": loss_sum / total,
        "train_acc": correct / total,
        "test_loss": test_loss,
        "test_acc": test_acc,
        "epoch_time_s": meter.time_s,
        "eval_time_s": eval_time,
        "time_s": progress.elapsed + meter.time_s,
        "samples_per_s": total / meter.time_s if meter.time_s > 0 else None,
        "steps": steps_per_epoch,
        "train_samples": total,
        **masks.record(),
        # training compute so far in SGD-step equivalents (forward+backward passes, counted by the optimizer)
        "compute": compute,
    }


def _epoch_line(record: dict[str, Any], epoch: int, epochs: int, time_s: float) -> str:
    """The epoch's line on stderr (accuracy in percent, as in every table and figure)."""
    test_acc = record["test_acc"]
    return (
        f"epoch {epoch}/{epochs}  train_loss {record['train_loss']:.4f}  train_acc {100 * record['train_acc']:.2f}%"
        + (f"  test_loss {record['test_loss']:.4f}  test_acc {100 * test_acc:.2f}%" if test_acc is not None else "")
        + f"  ({time_s:.1f} s"
        + (f", mask density {record['mask_density']:.3f}" if "mask_density" in record else "")
        + ")"
    )


# ---------------------------------------------------------------------------------- the pieces
def _data(cfg: TrainConfig, info: D.DistInfo) -> TrainData:
    per_rank = batch_per_rank(cfg, info.world_size)  # --batch-scope: global (split) or per process
    try:
        return build_data(cfg, device=info.device, rank=info.rank, world_size=info.world_size, batch_per_rank=per_rank)
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


def _model(cfg: TrainConfig, data: TrainData, info: D.DistInfo) -> tuple[nn.Module, Any, Any]:
    """(the model, its DDP wrapper or None, what the forward pass calls: compiled if --compile).
    With --fsdp under torchrun the model is sharded in place by FSDP2 (no wrapper)."""
    from ..models import create_model

    try:
        model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)
    except (ValueError, TypeError) as e:
        width = "" if cfg.width is None else f" --width {cfg.width}"  # the flags the user gave, not defaults
        raise ConfigError(f"--model {cfg.model!r}{width}: {e}") from None
    model.to(info.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch stubs: Module.to has no memory_format-only overload
    ddp = None
    if info.enabled and cfg.fsdp:  # FSDP2: parameters become DTensors (sparsam.train.sharding)
        sharding.shard_model(model, info.device, info.world_size)
    elif info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    wrapped = ddp if ddp is not None else model
    return model, ddp, torch.compile(wrapped) if cfg.compile else wrapped


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Any, autocast: Callable[[], Any], info: D.DistInfo, *, sharded: bool = False
) -> tuple[float, float]:
    """(mean loss, accuracy) over every rank's test batches. One host sync (two when ``sharded``)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss sum, correct, count
    n_batches, last = 0, None
    if sharded:  # FSDP gathers parameters in every forward: all ranks must run as many (shards differ by one image)
        most = torch.tensor([float(len(batches))], device=info.device)
        D.all_reduce_max(most, info)  # agreed before any forward, so the collectives pair up
        rounds = int(most.item())  # host sync
    for x, y in batches:
        with autocast():
            logits = model(x)
        sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += y.shape[0]
        n_batches, last = n_batches + 1, x
    if sharded:
        for _ in range(rounds - n_batches):
            if last is None:
                raise RuntimeError(
                    "--fsdp: a rank has no test images; use a larger test set than the number of processes"
                )
            with autocast():
                model(last[:1])
    D.all_reduce_sum(sums, info)
    loss_sum, correct, count = sums.tolist()  # host sync: once per evaluation
    model.train()
    return loss_sum / count, correct / count


class _MaskStats:
    """SSAM: the epoch's mask density, and how much the masks changed since the last epoch."""

    def __init__(self, opt: Any, *, resumed: bool) -> None:
        self.opt = opt if hasattr(opt, "masks") else None
        self.previous = self._snapshot() if resumed else None

    def _snapshot(self) -> dict[str, Tensor] | None:
        opt = self.opt
        if opt is None:
            return None
        names, current = opt.param_names(), opt.masks
        out = {}
        for g in opt.param_groups:
            for p in g["params"]:
                if g["rho"] > 0 and p.requires_grad:
                    m = current.get(names[p])
                    if _sharded.is_sharded(p):  # --fsdp: this rank's part; gathered whole (a collective)
                        local = (
                            m
                            if m is not None
                            else torch.zeros(_sharded.local(p).shape, dtype=torch.bool, device=_sharded.local(p).device)
                        )
                        whole: Any = _sharded.shard_like(local, p)
                        m = whole.full_tensor()
                    elif m is None:
                        m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                    out[names[p]] = m.detach().cpu().clone()
        return out

    def record(self) -> dict[str, Any]:
        snap = self._snapshot()
        if snap is None:
            return {}
        from ..masks import mask_stats

        ms = mask_stats(snap, self.previous)  # host syncs: mask statistics, once per epoch
        out = {"mask_density": ms["density"], "mask_perturbed": ms["perturbed"]}
        if self.previous is not None:
            out.update({"mask_overlap": ms["overlap"], "mask_jaccard": ms["jaccard"], "mask_changed": ms["changed"]})
        self.previous = snap
        return out


class _Bar:
    """The progress bar (rank 0, on a terminal, with tqdm): loss, accuracy and images/s every
    ``--log-every`` steps."""

    def __init__(self, *, enabled: bool, epochs: int, steps: int, log_every: int, world_size: int) -> None:
        self.tqdm: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.tqdm = tqdm
            except ImportError:
                pass
        self.epochs, self.steps, self.world_size = epochs, steps, world_size
        self.bar: Any = None

    def start(self, epoch: int, meter: EpochMeter) -> None:
        if self.tqdm is not None:
            self.bar = self.tqdm(
                total=self.steps,
                initial=meter.skip,
                desc=f"epoch {epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
            self.window = (*meter.snapshot(), time.perf_counter())

    def update(self, meter: EpochMeter, at_log: bool) -> None:
        if self.bar is None:
            return
        if at_log:  # host sync: progress-bar values, every --log-every steps
            loss0, correct0, count0, t0 = self.window
            n, now = meter.count - count0, time.perf_counter()
            self.bar.set_postfix(
                loss=f"{(meter.sums[0] - loss0).item() / n:.4f}",
                acc=f"{(meter.sums[1] - correct0).item() / n:.3f}",
                img_s=f"{n * self.world_size / (now - t0):.0f}",
            )
            self.window = (*meter.snapshot(), now)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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


__all__ = ["RunResult", "StopFlag", "evaluate", "train"]
