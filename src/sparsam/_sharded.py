"""Tensors sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``: DTensor parameters): the one
module where sparsam looks inside a DTensor, for SAM's step, SSAM's state and the mask selection.

**SAM's step on shards.** Under FSDP2 every rank holds one shard of each parameter (a ``DTensor``
with ``Shard`` placement, its ``p.grad`` the matching shard of the gradient, already averaged over
the ranks by FSDP's reduce-scatter). SAM's step is elementwise except for the norm, so it runs on
the local shards:

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

**Selection on shards** (``sparsam.masks``): top-k over scores sharded by FSDP2, a distributed
threshold with the one-process tie rule.

FSDP2 (``fully_shard``) shards every parameter along dim 0 in ``torch.chunk`` order: rank ``r``
holds a contiguous block of rows, so in the flat order ``select`` ranks by
(parameters in order, row-major inside each) the coordinates of one parameter lie rank 0's first,
then rank 1's, ... The flat order is therefore (parameter, rank, local position), and a rank can
place each of its coordinates in it from per-(parameter, rank) counts alone.

``sharded_top`` keeps, in every group of segments, the
``k`` largest scores with ties going to the lower flat positions (exactly what
``selection.top_positions`` does in one process), without gathering any score:

1. every score becomes an integer key with the same order (the IEEE-754 bit pattern, its lower
   bits flipped for negative numbers; ``-0.0`` counts as ``+0.0``, as ``==`` does): float32 keys
   span 2³² values, float64 keys 2⁶⁴;
2. one ``all_gather`` of each group's (count, min key, max key) per rank;
3. a bisection on the key: each round counts the local keys ``>= mid`` and all-reduces the
   counts (one int64 per group): at most 32 rounds for float32 scores (64 for float64), fewer when
   the keys span a narrower range; the result is the exact ``k``-th largest key ``T``;
4. one ``all_gather`` of each segment's (keys ``> T``, keys ``== T``) per rank: every rank then
   knows how many tied coordinates lie at lower flat positions than its own and takes the
   ``k - #(> T)`` first ties of the group.

So a selection costs ``2 +`` (number of bisection rounds) collectives of a few integers per group,
whatever the number of coordinates.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
from torch import Tensor

if TYPE_CHECKING:  # importing it costs 1-2 s: only looked up at run time (_dtensor_class)
    from torch.distributed.tensor import DTensor

__all__ = [
    "FSDP1_REFUSAL",
    "check_layout",
    "check_not_fsdp1",
    "chunk_starts",
    "Comm",
    "first_mesh",
    "gather_vectors",
    "is_sharded",
    "loaded_mask",
    "local",
    "local_numel_bytes",
    "local_part",
    "mask_shape_error",
    "order_keys",
    "reduce_max",
    "reduce_norm",
    "saved_masks",
    "shard_like",
    "sharded_draw",
    "sharded_top",
    "sharding_of",
    "wide_keys",
]

_I64_MAX = 2**63 - 1
_I64_MIN = -(2**63)

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


def is_sharded(t: object) -> TypeGuard[DTensor]:
    """True for a DTensor (a parameter or gradient sharded by FSDP2 / tensor parallelism)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same tensor object every call, outside autograd), else ``t``."""
    if is_sharded(t):
        return t._local_tensor  # to_local() under no_grad: the stored shard
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
    from torch.distributed.tensor import Shard  # loaded: p is a DTensor

    (placement,) = p.placements
    if not isinstance(placement, Shard):  # pragma: no cover - sharding_of and check_layout refuse it first
        raise ValueError(f"cannot cut a tensor placed as {placement} into this rank's part: it is not sharded")
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
    return next((p.device_mesh for p in params if is_sharded(p)), None)


def reduce_max(flag: Tensor, mesh: Any) -> Tensor:
    """``flag`` maximised over the ranks of ``mesh`` (a GradScaler overflow found on any shard)."""
    import torch.distributed as dist

    out = flag.detach().float().reshape(1).clone()
    group = mesh.get_group()
    if dist.get_backend(group) == "nccl" and out.device.type != "cuda":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out.to(flag.device, flag.dtype).reshape(flag.shape)


def shard_like(part: Tensor, like: Any) -> Tensor:
    """``part`` (this rank's part of a tensor of ``like``'s global shape) as a DTensor sharded as
    ``like`` is, so ``torch.distributed.checkpoint`` saves it sharded and can load it at another
    world size; ``part`` itself when ``like`` is not sharded."""
    if not is_sharded(like):
        return part
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        part, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
    )


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
    out = {index[p]: shard_like(m.clone(), p) for p, m in masks.items()}
    for p, i in index.items():
        if is_sharded(p) and i not in out:
            shard = local(p)
            out[i] = shard_like(torch.zeros(shard.shape, dtype=torch.bool, device=shard.device), p)
    return dict(sorted(out.items()))


# -- selection on shards (sparsam.masks) ------------------------------------------------------------
def check_layout(t: Any, name: str) -> None:
    """Refuse a DTensor that is not sharded as FSDP2 shards: dim 0 over a 1-D mesh."""
    from torch.distributed.tensor import Shard  # loaded: t is a DTensor

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),):
        raise ValueError(
            f"{name}: selection on sharded tensors needs FSDP2's layout (Shard(0) over a 1-D device mesh), got "
            f"placements {tuple(t.placements)} on a {t.device_mesh.ndim}-D mesh: the flat order of the coordinates "
            "would not be (tensor, rank, local position)"
        )


def sharded_draw(params: Any, generator: torch.Generator) -> dict[str, Tensor] | None:
    """Uniform scores for ``params`` (name -> parameter) drawn as one process draws them (one
    ``torch.rand`` of each full shape, in order, from ``generator``), kept as DTensors holding this
    rank's rows only: a full tensor exists for one parameter at a time. ``None`` when no parameter
    is sharded (draw as usual)."""
    if not any(map(is_sharded, params.values())):
        return None
    out = {}
    for n, p in params.items():
        full = torch.rand(p.shape, generator=generator)
        if not is_sharded(p):
            raise ValueError(f"parameter {n!r} is a plain tensor next to sharded (FSDP2) ones")
        check_layout(p, f"parameter {n!r}")
        part = local_part(full, p).to(local(p).device).clone()
        out[n] = shard_like(part, p)
    return out


class Comm:
    """The few collectives of the selection, over one process group (a 1-D device mesh's)."""

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.calls = 0  # collectives issued (docs/scaling.md states the count)

    @classmethod
    def of(cls, t: Any) -> Comm:
        return cls(t.device_mesh.get_group())

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        self.calls += 1
        buf = t.to(self.device).clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.to(t.device)

    def all_gather(self, t: Tensor) -> Tensor:
        """``[world, *t.shape]``: every rank's ``t`` (same shape on every rank)."""
        import torch.distributed as dist

        self.calls += 1
        buf = t.to(self.device).contiguous()
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(parts, buf, group=self.group)
        return torch.stack(parts).to(t.device)

    def broadcast_(self, t: Tensor) -> Tensor:
        """``t`` overwritten with rank 0's (of the group) values, in place."""
        import torch.distributed as dist

        self.calls += 1
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        buf = t.detach().to(self.device).contiguous()
        dist.broadcast(buf, src=src, group=self.group)
        if buf.data_ptr() != t.data_ptr():
            t.detach().copy_(buf)
        return t

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's (of the group) ``obj``, on every rank."""
        import torch.distributed as dist

        self.calls += 1
        box = [obj]
        src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
        dist.broadcast_object_list(box, src=src, group=self.group, device=self.device)
        return box[0]


def gather_vectors(parts: Sequence[Tensor], comm: Any) -> tuple[list[Tensor], list[int]]:
    """Every rank's 1-D tensors ``parts[i]`` (float64, lengths free) joined in rank order: the full
    vector of each ``i``, and this rank's offset in it. Two collectives."""
    lengths = torch.tensor([p.numel() for p in parts], dtype=torch.int64)
    all_len = comm.all_gather(lengths)  # [world, S]
    width = int(all_len.sum(1).max()) if all_len.numel() else 0
    flat = torch.cat([p.reshape(-1).to(torch.float64).cpu() for p in parts]) if parts else torch.zeros(0)
    padded = torch.zeros(width, dtype=torch.float64)
    padded[: flat.numel()] = flat
    everyone = comm.all_gather(padded)  # [world, width]
    full: list[list[Tensor]] = [[] for _ in parts]
    for w in range(all_len.shape[0]):
        i0 = 0
        for i in range(len(parts)):
            n = int(all_len[w, i])
            full[i].append(everyone[w, i0 : i0 + n])
            i0 += n
    offsets = [int(all_len[: comm.rank, i].sum()) for i in range(len(parts))]
    return [torch.cat(f) if f else torch.zeros(0, dtype=torch.float64) for f in full], offsets


def wide_keys(dtypes: Sequence[torch.dtype]) -> bool:
    """Whether scores of these dtypes are compared as float64 (as ``select`` does for float64,
    integer or bool scores); float16/bfloat16/float32 compare exactly as float32."""
    return any(not d.is_floating_point or d == torch.float64 for d in dtypes)


def order_keys(values: Tensor, *, wide: bool, largest: bool = True) -> Tensor:
    """Integer keys ordered as ``values`` (as float32, or float64 when ``wide``): equal values give
    equal keys (``-0.0`` and ``+0.0`` included), a larger value a larger key; with ``largest=False``
    the order is reversed. NaN has no place in the order (callers refuse it)."""
    v = values.detach().reshape(-1).to(torch.float64 if wide else torch.float32)
    v = torch.where(v == 0, torch.zeros_like(v), v)  # -0.0 -> +0.0
    bits = v.view(torch.int64 if wide else torch.int32)
    low = _I64_MAX if wide else 2**31 - 1
    keys = bits ^ ((bits >> (63 if wide else 31)) & low)  # negative numbers: flip all but the sign bit
    return keys if largest else ~keys


def sharded_top(
    values: Sequence[Tensor],
    groups: Sequence[int],
    ks: Sequence[int],
    comm: Any,
    *,
    largest: bool = True,
    wide: bool | None = None,
) -> list[Tensor]:
    """In each group of segments keep the ``ks[g]`` largest (or smallest) values over all ranks.

    Args:
        values: this rank's 1-D scores of each segment, segments in their global order (every
            rank passes the same number of segments; a segment's parts lie in rank order).
        groups: the group of each segment (``0 .. len(ks) - 1``).
        ks: the number of values to keep in each group (over all ranks).
        comm: the collectives (``Comm``, or a stand-in with ``rank``, ``all_reduce_sum`` and
            ``all_gather``).
        largest: keep the largest (default) or the smallest values.
        wide: compare as float64; ``None``: as ``select`` would for these dtypes.

    Returns:
        this rank's bool keep mask of each segment. Ties go to the lower flat position
        (segment, then rank, then local index).

    Raises:
        ValueError: a ``k`` outside ``[0, n]`` for its group.
    """
    n_seg, n_groups = len(values), len(ks)
    if len(groups) != n_seg:
        raise ValueError(f"got {n_seg} segments but {len(groups)} group labels")
    if wide is None:
        wide = wide_keys([v.dtype for v in values])
    keys = [order_keys(v, wide=wide, largest=largest) for v in values]
    stats = torch.zeros(n_groups, 3, dtype=torch.int64)
    stats[:, 1], stats[:, 2] = _I64_MAX, _I64_MIN
    for key, g in zip(keys, groups):
        if key.numel():
            stats[g, 0] += key.numel()
            stats[g, 1] = min(int(stats[g, 1]), int(key.min()))
            stats[g, 2] = max(int(stats[g, 2]), int(key.max()))
    every = comm.all_gather(stats)  # [world, G, 3]
    total = [int(x) for x in every[:, :, 0].sum(0)]
    lo = [int(x) for x in every[:, :, 1].min(0).values]
    hi = [int(x) for x in every[:, :, 2].max(0).values]
    for g, k in enumerate(ks):
        if not 0 <= int(k) <= total[g]:
            raise ValueError(f"k must be in [0, {total[g]}] for group {g}, got {k}")
    active = [g for g in range(n_groups) if 0 < ks[g] < total[g]]
    # Bisection: T[g] = the largest key t with #(keys >= t) >= k, i.e. the k-th largest key.
    while True:
        todo = [g for g in active if lo[g] < hi[g]]
        if not todo:
            break
        mid = {g: lo[g] + (hi[g] - lo[g] + 1) // 2 for g in todo}
        counts = torch.zeros(n_groups, dtype=torch.int64)
        for key, g in zip(keys, groups):
            if g in mid and key.numel():
                counts[g] += int((key >= mid[g]).sum())
        counts = comm.all_reduce_sum(counts)
        for g in todo:
            if int(counts[g]) >= ks[g]:
                lo[g] = mid[g]
            else:
                hi[g] = mid[g] - 1
    thr = lo
    mine = torch.zeros(n_seg, 2, dtype=torch.int64)
    for i, (key, g) in enumerate(zip(keys, groups)):
        if g in active and key.numel():
            mine[i, 0] = int((key > thr[g]).sum())
            mine[i, 1] = int((key == thr[g]).sum())
    seen = comm.all_gather(mine)  # [world, S, 2]
    above = [0] * n_groups
    for i, g in enumerate(groups):
        above[g] += int(seen[:, i, 0].sum())
    ties_before = [0] * n_groups  # ties of the group at lower flat positions than segment i
    out = []
    for i, (key, g) in enumerate(zip(keys, groups)):
        if g not in active:
            out.append(torch.full(key.shape, ks[g] == total[g] and ks[g] > 0, dtype=torch.bool, device=key.device))
            continue
        need = ks[g] - above[g]
        before = ties_before[g] + int(seen[: comm.rank, i, 1].sum())
        take = min(max(need - before, 0), int(seen[comm.rank, i, 1]))
        ties_before[g] += int(seen[:, i, 1].sum())
        keep = key > thr[g]
        if take > 0:
            tie = key == thr[g]
            keep |= tie & (tie.cumsum(0) <= take)
        out.append(keep)
    return out


def chunk_starts(length: int, world: int) -> list[int]:
    """Where each rank's part of a dimension of ``length`` starts, as ``torch.chunk`` cuts it
    (ranks past the last chunk hold nothing)."""
    if length == 0:
        return [0] * world
    size = -(-length // world)
    return [min(r * size, length) for r in range(world)]
