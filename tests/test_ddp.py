"""Two gloo processes on 127.0.0.1: weights stay bit-identical across ranks, masks too."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsam import SAM, SSAM
from sparsam.masks import RandomMask

from .launch import free_port, spawn_ranks
from .reference import tiny_data, tiny_net

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


CONFIGS = [(k, a) for k in ("sam", "ssam") for a in ("local", "sync")]


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind, ascent in CONFIGS:  # one process group for every configuration: spawning is slow
            _train(rank, out_dir, kind, ascent)
    finally:
        dist.destroy_process_group()


def _train(rank, out_dir, kind, ascent):
    model = DDP(tiny_net(bn=False))
    x, y = tiny_data(n=16, seed=10 + rank)  # each rank sees its own data
    if kind == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9, model=model, ascent=ascent)
    else:
        # a different seed on each rank: without the broadcast the masks would differ
        mask = RandomMask(0.5, seed=rank, update_every=2)
        opt = SSAM(
            model.parameters(), torch.optim.SGD, rho=0.2, mask=mask, lr=0.1, momentum=0.9, model=model, ascent=ascent
        )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    result = {"params": [p.detach().clone() for p in model.module.parameters()]}
    if kind == "ssam":
        result["masks"] = opt.masks
    torch.save(result, os.path.join(out_dir, f"{kind}-{ascent}-rank{rank}.pt"))


@pytest.fixture(scope="module")
def ddp_results():
    with tempfile.TemporaryDirectory() as d:
        spawn_ranks(_worker, 2, free_port(), d)
        return {
            (k, a): [torch.load(os.path.join(d, f"{k}-{a}-rank{r}.pt"), weights_only=True) for r in range(2)]
            for k, a in CONFIGS
        }


@pytest.mark.parametrize("kind", ["sam", "ssam"])
@pytest.mark.parametrize("ascent", ["local", "sync"])
def test_ranks_stay_bit_identical(ddp_results, kind, ascent):
    r0, r1 = ddp_results[(kind, ascent)]
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    if kind == "ssam":
        assert r0["masks"].keys() == r1["masks"].keys()
        assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    if kind == "sam" and ascent == "sync":
        # synchronised ascent = single-process SAM on the union of the ranks' batches
        model = tiny_net(bn=False)
        xs, ys = zip(*(tiny_data(n=16, seed=10 + r) for r in range(2)))
        x, y = torch.cat(xs), torch.cat(ys)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for _ in range(5):
            opt.step(closure)
        for p, q in zip(model.parameters(), r0["params"]):
            torch.testing.assert_close(p.detach(), q, rtol=1e-10, atol=1e-12)


def test_local_and_sync_ascent_differ(ddp_results):
    local, sync = ddp_results[("sam", "local")][0], ddp_results[("sam", "sync")][0]
    assert not all(torch.equal(a, b) for a, b in zip(local["params"], sync["params"]))
