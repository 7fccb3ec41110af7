"""Process-group setup for torchrun (env:// init), and the few collectives the engine uses."""

from __future__ import annotations

import gc
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def setup(device_spec: str) -> DistInfo:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1), else run alone.

    Backend: nccl for CUDA devices, gloo otherwise. Each process uses ``cuda:LOCAL_RANK``.
    A process group that already exists (a caller set it up) is used as it is.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        device = _pick_device(device_spec, local_rank)
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, False)
    if world <= 1:
        return DistInfo(0, 1, 0, _pick_device(device_spec, 0), False)
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but torch.distributed is not available in this torch build")
    device = _pick_device(device_spec, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, True)


def teardown(info: DistInfo) -> None:
    """Destroy the process group ``setup`` created, collecting garbage before and after: an object
    that still holds the group or one of its gloo work items (an FSDP2 module's device mesh, an
    optimizer's pending work, reference cycles) would otherwise be freed while the interpreter shuts
    down, where gloo's threads can abort the process ("terminate called without an active
    exception")."""
    if info.initialized_here and dist.is_initialized():
        gc.collect()  # objects the run left in reference cycles go while the group still exists
        dist.destroy_process_group()
        gc.collect()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is true on any rank (a collective: every rank must call it)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())  # host sync, only at the points where ranks agree to stop


def barrier(info: DistInfo) -> None:
    if info.enabled:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def broadcast_buffers(module: torch.nn.Module, info: DistInfo) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, so after the last training step every
    rank still holds statistics updated by its own last batch. Evaluation and checkpoints use
    rank 0's, as DDP's next forward would.
    """
    if info.enabled:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def dump_rank_state(
    folder: Path, info: DistInfo, *, model: torch.nn.Module, opt: Any, train_loader: Any, samples_seen: int, epoch: int
) -> None:
    """Save this rank's final weights (and their SHA-256), SSAM masks and the training samples it
    drew in epoch 0 to ``folder/rank{R}.pt``: how ``tests/test_train_ddp.py`` checks that the ranks
    trained on disjoint data and still ended bit-identical (``SPARSAM_DEBUG_RANK_DUMP=1``)."""
    shard_epoch0 = None
    if hasattr(train_loader, "indices"):
        train_loader.set_epoch(0)
        shard_epoch0 = train_loader.indices()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "digest": h.hexdigest(),
            "rank": info.rank,
            "world_size": info.world_size,
            "samples_seen": samples_seen,
            "epoch": epoch,
            "shard_epoch0": shard_epoch0,
            "masks": {k: v.cpu() for k, v in opt.masks.items()} if hasattr(opt, "masks") else None,
        },
        folder / f"rank{info.rank}.pt",
    )
