"""``sparsam train --fsdp``: the model sharded by FSDP2, and checkpoints of full (unsharded) tensors.

Sharding: every top-level child module that holds parameters becomes one FSDP2 unit
(``fully_shard``), then the root (which takes any parameter left). The optimizer then sees DTensor
parameters, which SAM, ASAM and SSAM with random masks step per local shard (``docs/scaling.md``).

Checkpoints keep the format of every other run (``checkpoint.pt``, one file, written by rank 0):
``full_state`` gathers every DTensor of the model's and the optimizer's state dicts into a full
CPU tensor (``full_tensor()``: a collective, so every rank calls it, in the same order), and
``shard_checkpoint`` cuts the full tensors of a loaded checkpoint back to this rank's shards,
sharded like the parameters they belong to. So a run checkpointed under ``--fsdp`` resumes under
``--fsdp`` at any number of processes, or under DDP, and the other way round. Each rank holds the
full state briefly while it is gathered: meant for the models of ``sparsam.models``; a model too
large for that is checkpointed with ``torch.distributed.checkpoint`` (``docs/scaling.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import _sharded


def shard_model(model: nn.Module, device: torch.device, world_size: int) -> None:
    """Apply ``fully_shard`` to each top-level child with parameters, then to ``model`` (in place)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    for child in model.children():
        if next(child.parameters(), None) is not None:
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)


def full_state(obj: Any) -> Any:
    """``obj`` (nested dicts / lists of tensors) with every DTensor gathered into a full CPU tensor.
    A collective: every rank calls it with the same structure (dict keys are visited sorted)."""
    if _sharded.is_sharded(obj):
        return obj.full_tensor().cpu()
    if isinstance(obj, Mapping):
        done = {k: full_state(obj[k]) for k in sorted(obj, key=repr)}
        return {k: done[k] for k in obj}
    if isinstance(obj, list):
        return [full_state(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(full_state(v) for v in obj)
    return obj


def _like(value: Any, p: Any) -> Any:
    """A full tensor of ``p``'s global shape as a DTensor sharded like ``p`` (this rank's part);
    anything else unchanged (a wrongly shaped tensor is then refused by the load that follows)."""
    if not (
        _sharded.is_sharded(p)
        and isinstance(value, Tensor)
        and not _sharded.is_sharded(value)
        and value.shape == p.shape
    ):
        return value
    from torch.distributed.tensor import DTensor

    part = _sharded.local_part(value.to(_sharded.local(p).device), p).contiguous().clone()
    return DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def shard_checkpoint(ckpt: dict[str, Any], model: nn.Module, opt: Any) -> dict[str, Any]:
    """A loaded checkpoint (full tensors) with the model's and the optimizer's tensors cut to this
    rank's shards, ready for ``load_state_dict`` on the sharded model and its optimizer."""
    out = dict(ckpt)
    template = model.state_dict()
    out["model"] = {k: _like(v, template.get(k)) for k, v in ckpt["model"].items()}
    params = [p for g in opt.param_groups for p in g["params"]]  # the state dict's parameter indices

    def param(i: Any) -> Any:
        return params[i] if isinstance(i, int) and 0 <= i < len(params) else None

    sd = ckpt["optimizer"]
    if isinstance(sd, Mapping):
        sd = dict(sd)
        if isinstance(sd.get("state"), Mapping):
            sd["state"] = {
                i: ({k: _like(v, param(i)) for k, v in st.items()} if isinstance(st, Mapping) else st)
                for i, st in sd["state"].items()
            }
        extra = sd.get("sparsam")
        if isinstance(extra, Mapping) and isinstance(extra.get("masks"), Mapping):
            sd["sparsam"] = {**extra, "masks": {i: _like(m, param(i)) for i, m in extra["masks"].items()}}
        out["optimizer"] = sd
    return out


__all__ = ["full_state", "shard_checkpoint", "shard_model"]
