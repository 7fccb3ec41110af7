"""SAM on parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters).

Under FSDP2 every rank holds one shard of each parameter (a ``DTensor`` with ``Shard`` placement,
its ``p.grad`` the matching shard of the gradient, already averaged over the ranks by FSDP's
reduce-scatter). SAM's step is elementwise except for the norm, so it runs on the local shards:

* the perturbation ``e = rho · T² g / (‖T g‖₂ + eps)``, the copy of ``w`` and the restore are done
  on ``p.to_local()`` / ``p.grad.to_local()``: the copy of ``w`` is one shard per rank;
* ``‖T g‖₂`` is the norm over *all* shards of all perturbed parameters: every rank sums the squares
  of its local terms and one ``all_reduce(SUM)`` over the parameters' process group adds them up
  (one scalar; no gradient is gathered).

The norm can only be formed this way when every perturbed parameter is sharded over the same
1-D device mesh (each coordinate lives on exactly one rank). A plain tensor next to sharded ones
would be counted once per rank (or with a different gradient on each rank), a replicated DTensor
likewise, and parameters on different meshes would need different all-reduces: these are refused
with an error naming the parameter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FSDP1_REFUSAL",
    "check_not_fsdp1",
    "first_mesh",
    "is_sharded",
    "loaded_mask",
    "local",
    "local_numel_bytes",
    "local_part",
    "mask_shape_error",
    "reduce_max",
    "reduce_norm",
    "saved_mask",
    "saved_masks",
    "sharding_of",
]


FSDP1_REFUSAL = (
    "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel) hands the optimizer each rank's slice of the "
    "flattened parameters as plain tensors, so SAM cannot form the perturbation norm over all shards (every rank "
    "would perturb with the norm of its own slice) and SSAM cannot choose its masks over the full parameters. Use "
    "FSDP2 (torch.distributed.fsdp.fully_shard: DTensor parameters, which SAM and SSAM step; see docs/scaling.md)"
)


def check_not_fsdp1(params: Iterable[Tensor], model: Any = None) -> None:
    """Refuse parameters managed by FSDP1, and a ``model`` that is or holds an FSDP1 module.

    FSDP1 marks every tensor it flattens (its ``FlatParameter`` with ``use_orig_params=False``,
    the original parameters, now views into it, with ``use_orig_params=True``) with the attribute
    ``_fsdp_flattened``; FSDP2's DTensors do not carry it.

    Raises:
        ValueError: naming the first such parameter (or the model), with the reason and what to use.
    """
    for i, p in enumerate(params):
        if getattr(p, "_fsdp_flattened", False):
            raise ValueError(
                f"parameter #{i} (shape {tuple(p.shape)}) is managed by FSDP1, which SAM and SSAM do not support: "
                + FSDP1_REFUSAL
            )
    # No FSDP1 module can exist before torch.distributed.fsdp is imported: never import it just to ask.
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if model is not None and fsdp1 is not None and any(isinstance(m, fsdp1) for m in model.modules()):
        raise ValueError(f"model= is wrapped in FSDP1, which SAM and SSAM do not support: {FSDP1_REFUSAL}")


def _dtensor_class() -> Any:
    """``DTensor``, or ``None`` while ``torch.distributed.tensor`` is not imported.

    Importing that module costs 1-2 s, so sparsam never imports it just to ask: no DTensor can
    exist before something (``fully_shard``, a device mesh) has imported it."""
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def is_sharded(t: Any) -> bool:
    """True for a DTensor (a parameter or gradient sharded by FSDP2 / tensor parallelism)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same tensor object every call, outside autograd), else ``t``."""
    if is_sharded(t):
        return t._local_tensor  # type: ignore[attr-defined]  # to_local() under no_grad: the stored shard
    return t


def sharding_of(params: Iterable[Tensor]) -> Any:
    """The device mesh shared by ``params`` when they are sharded, ``None`` when none is.

    Raises:
        ValueError: plain and sharded parameters mixed, a parameter not sharded on every mesh
            dimension (replicated: it would be counted once per replica), a mesh with more than
            one dimension, or two different meshes.
    """
    mesh, plain, first = None, None, None
    p: Any
    for i, p in enumerate(params):
        if not is_sharded(p):
            plain = plain if plain is not None else (i, tuple(p.shape))
            continue
        if mesh is None:
            mesh, first = p.device_mesh, (i, tuple(p.shape))
        elif p.device_mesh != mesh:
            raise ValueError(
                f"SAM's global norm needs every sharded parameter on one device mesh; parameter #{i} of shape "
                f"{tuple(p.shape)} is on {p.device_mesh}, parameter #{first[0] if first else '?'} on {mesh}"
            )
        from torch.distributed.tensor import Shard  # loaded: p is a DTensor

        if p.device_mesh.ndim != 1 or not all(isinstance(pl, Shard) for pl in p.placements):
            raise ValueError(
                f"SAM supports parameters sharded over a 1-D device mesh (fully_shard); parameter #{i} of shape "
                f"{tuple(p.shape)} has placements {p.placements} on a {p.device_mesh.ndim}-D mesh: a replicated "
                "coordinate would be counted once per replica in the norm"
            )
    if mesh is not None and plain is not None:
        raise ValueError(
            f"SAM got sharded (FSDP2) and plain parameters in its perturbed groups (plain: parameter #{plain[0]} of "
            f"shape {plain[1]}): the global norm would count a plain tensor once per rank, or with a different "
            "gradient on each rank. Apply fully_shard to the module holding it, or give it rho=0 in its own group"
        )
    return mesh


def reduce_norm(local_norm: Tensor, mesh: Any) -> Tensor:
    """The global L2 norm from this rank's norm over its shards: one all-reduce of a scalar."""
    import torch.distributed as dist

    sq = local_norm.square().reshape(1)
    group = mesh.get_group()
    if dist.get_backend(group) == "nccl" and sq.device.type != "cuda":
        sq = sq.cuda()
    dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
    return sq.to(local_norm.device).reshape(()).sqrt()


def local_numel_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes held on this rank by ``tensors`` (local shards for DTensors)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def local_part(full: Tensor, p: Any) -> Tensor:
    """This rank's part of ``full`` (a tensor of ``p``'s global shape), as ``p`` is sharded: the
    chunk ``torch.chunk`` gives along the sharded dimension (FSDP2's layout)."""
    if not is_sharded(p):
        return full
    (placement,) = p.placements
    mesh = p.device_mesh
    chunks = torch.chunk(full, mesh.size(), dim=placement.dim)
    rank = mesh.get_local_rank()
    part = chunks[rank] if rank < len(chunks) else full.narrow(placement.dim, 0, 0)
    if part.shape != local(p).shape:  # pragma: no cover - a layout other than FSDP2's
        raise ValueError(f"cannot cut a mask of shape {tuple(full.shape)} to this rank's shard {tuple(local(p).shape)}")
    return part


def mask_shape_error(m: Tensor, p: Tensor) -> str:
    """The message for a mask whose shape does not fit its (possibly sharded) parameter."""
    if not is_sharded(p):
        return f"mask shape {tuple(m.shape)} does not match its parameter's shape {tuple(p.shape)}"
    shard = tuple(local(p).shape)
    if m.shape == p.shape and m.shape != local(p).shape:
        return (
            f"mask of the full shape {tuple(m.shape)} given for a parameter sharded by FSDP2: masks are per shard, "
            f"give this rank's part (shape {shard})"
        )
    return (
        f"mask shape {tuple(m.shape)} does not match this rank's shard {shard} of a parameter of shape "
        f"{tuple(p.shape)} (a state saved with another world size has other shard shapes)"
    )


def first_mesh(params: Iterable[Tensor]) -> Any:
    """The device mesh of the first sharded tensor in ``params`` (``None`` if none is sharded)."""
    return next((p.device_mesh for p in params if is_sharded(p)), None)  # type: ignore[attr-defined]


def reduce_max(flag: Tensor, mesh: Any) -> Tensor:
    """``flag`` maximised over the ranks of ``mesh`` (a GradScaler overflow found on any shard)."""
    import torch.distributed as dist

    out = flag.detach().float().reshape(1).clone()
    group = mesh.get_group()
    if dist.get_backend(group) == "nccl" and out.device.type != "cuda":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out.to(flag.device, flag.dtype).reshape(flag.shape)


def saved_mask(m: Tensor, p: Any) -> Tensor:
    """A mask as SSAM's state dict holds it: for a sharded parameter, a DTensor of the parameter's
    global shape and sharding (so ``torch.distributed.checkpoint`` saves it sharded and can load it
    at another world size); else the mask itself."""
    if not is_sharded(p):
        return m
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(m, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(), run_check=False)


def loaded_mask(m: Any, p: Any) -> Tensor:
    """The local mask from a saved one: a DTensor mask must be sharded as ``p`` is now (load a
    checkpoint of another world size through ``torch.distributed.checkpoint``, which reshards)."""
    if not is_sharded(m):
        return m
    if not is_sharded(p) or m.device_mesh != p.device_mesh or m.placements != p.placements or m.shape != p.shape:
        raise ValueError(
            f"checkpoint's mask of shape {tuple(m.shape)} is sharded as {m.placements}, the parameter "
            f"{'is not sharded' if not is_sharded(p) else f'as {p.placements} on another mesh or shape'}: "
            "load sharded checkpoints with torch.distributed.checkpoint, which reshards to this run"
        )
    return local(m)


def saved_masks(masks: Mapping[Tensor, Tensor], index: Mapping[Tensor, int]) -> dict[int, Tensor]:
    """SSAM's masks by parameter index for its state dict. Every sharded parameter gets an entry on
    every rank (all False where this rank's shard has no mask), so a sharded checkpoint holds each
    mask whole."""
    out = {index[p]: saved_mask(m.clone(), p) for p, m in masks.items()}
    for p, i in index.items():
        if is_sharded(p) and i not in out:
            shard = local(p)
            out[i] = saved_mask(torch.zeros(shard.shape, dtype=torch.bool, device=shard.device), p)
    return dict(sorted(out.items()))
