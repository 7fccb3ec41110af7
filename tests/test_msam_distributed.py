"""MSAM and sparse MSAM with two gloo processes: under DDP (the momentum is the same on every rank, so
the step needs no communication of its own) and under FSDP2 (one all-reduce of a scalar per step,
for the norm over the shards), each against one process on the whole batch. One spawn runs every
configuration (process start-up dominates the cost)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsam import MSAM, SparseMSAM
from sparsam.masks import RandomMask

from .launch import free_port, spawn_ranks
from .reference import tiny_data, tiny_net

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD, STEPS = 2, 4
KW = {"rho": 0.5, "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}


def rank_data(rank, step):
    return tiny_data(n=8, seed=100 * step + 10 + rank)


def whole_batch(step):
    xs, ys = zip(*(rank_data(r, step) for r in range(WORLD)))
    return torch.cat(xs), torch.cat(ys)


def fsdp_model():
    torch.manual_seed(0)
    # 7 and 5 rows: shards of unequal size (FSDP2 pads the last one)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


class Calls:
    """Counts the collectives torch.distributed's Python API runs while active (DDP's gradient
    all-reduce runs in its C++ reducer and FSDP2's reduce-scatter is not an all-reduce: neither counts)."""

    names = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor")

    def __init__(self):
        self.count = 0
        self.active = False
        for name in self.names:
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                if self.active:
                    self.count += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)


def train(opt, model, data, calls=None):
    for step in range(STEPS):
        x, y = data(step)

        def closure(x=x, y=y):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.zero_grad()
        if calls is not None:
            calls.active = True
        opt.step(closure)
        if calls is not None:
            calls.active = False


def _worker(rank, world, port, out):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls = Calls()
    result = {}
    # DDP, dense: every rank its own half of each batch
    model = DDP(tiny_net())
    opt = MSAM(model.parameters(), torch.optim.SGD, model=model, **KW)
    calls.count = 0
    train(opt, model, lambda s: rank_data(rank, s), calls)
    result["ddp"] = {"params": [p.detach().clone() for p in model.module.parameters()], "calls": calls.count}
    # DDP, sparse: a different mask seed on each rank; the masks are broadcast from rank 0
    model = DDP(tiny_net())
    mask = RandomMask(0.5, seed=rank, update_every=2)
    opt = SparseMSAM(model.parameters(), torch.optim.SGD, mask=mask, model=model, **KW)
    train(opt, model, lambda s: rank_data(rank, s))
    result["ddp-sparse"] = {"params": [p.detach().clone() for p in model.module.parameters()], "masks": opt.masks}
    # FSDP2: parameters sharded over the two ranks (float32)
    model = fsdp_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MSAM(model.parameters(), torch.optim.SGD, **KW)
    first_step = opt.first_step
    in_first = {"n": 0}

    def counted_first_step(*args, **kwargs):
        before = calls.count
        calls.active = True
        try:
            return first_step(*args, **kwargs)
        finally:
            calls.active = False
            in_first["n"] += calls.count - before

    opt.first_step = counted_first_step

    def fsdp_data(step):
        x, y = whole_batch(step)
        return x.float().chunk(WORLD)[rank], y.chunk(WORLD)[rank]

    train(opt, model, fsdp_data)
    result["fsdp"] = {"params": [p.full_tensor() for p in model.parameters()], "calls": in_first["n"]}
    torch.save(result, f"{out}/rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path_factory.mktemp("msam")
    spawn_ranks(_worker, WORLD, free_port(), str(out), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
def test_ddp_equals_one_process_and_adds_no_communication(ranks):
    r0, r1 = ranks[0]["ddp"], ranks[1]["ddp"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))  # ranks bit-identical
    assert r0["calls"] == r1["calls"] == 0  # the momentum is already the same everywhere
    ref = tiny_net()
    opt = MSAM(ref.parameters(), torch.optim.SGD, **KW)
    train(opt, ref, whole_batch)
    for p, q in zip(ref.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_ddp_sparse_ranks_share_masks_and_weights(ranks):
    r0, r1 = ranks[0]["ddp-sparse"], ranks[1]["ddp-sparse"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])


@pytest.mark.slow
def test_fsdp2_equals_one_process_with_one_all_reduce_per_step(ranks):
    r0, r1 = ranks[0]["fsdp"], ranks[1]["fsdp"]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    # one all-reduce of the norm per step that perturbs (the first step has no momentum yet)
    assert r0["calls"] == r1["calls"] == STEPS - 1
    ref = fsdp_model()
    opt = MSAM(ref.parameters(), torch.optim.SGD, **KW)
    train(opt, ref, lambda s: (whole_batch(s)[0].float(), whole_batch(s)[1]))
    for p, q in zip(ref.parameters(), r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6)
