"""SAM on parameters sharded by FSDP2 (fully_shard, DTensor): 2 gloo processes on the CPU against a
single process that runs the same model on the whole batch."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsam import SAM

fsdp = pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")
if not hasattr(fsdp, "fully_shard") or not dist.is_available():
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)

WORLD, STEPS, BATCH = 2, 4, 12


def make_model():
    torch.manual_seed(0)
    # 7 and 5 rows: shards of unequal size (FSDP2 pads the last one), and a bias of odd length
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def make_opt(params, model, adaptive):
    return SAM(params, torch.optim.SGD, rho=0.2, adaptive=adaptive, lr=0.1, momentum=0.9, model=model)


def run(model, opt, rank=0, world=1):
    for step in range(STEPS):
        x, y = batch(step)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

        def closure(xs=xs, ys=ys):
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        opt.zero_grad()
        opt.step(closure)


def _worker(rank, world, port, out, adaptive):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = make_model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = make_opt(model.parameters(), model, adaptive)
        run(model, opt, rank, world)
        full = [p.full_tensor() for p in model.parameters()]
        backup_bytes = sum(b.numel() * b.element_size() for b in opt._backup.values())
        param_bytes = sum(t.numel() * t.element_size() for t in full)
        torch.save({"params": full, "backup_bytes": backup_bytes, "param_bytes": param_bytes}, f"{out}/rank{rank}.pt")

        # Bad input: a plain (unsharded) parameter next to sharded ones.
        extra = nn.Linear(3, 2)
        bad = make_opt(list(model.parameters()) + list(extra.parameters()), model, adaptive)
        x, y = batch(0)
        F.cross_entropy(extra(model(x)), torch.zeros(BATCH, dtype=torch.long)).backward()
        try:
            bad.first_step()
        except ValueError as exc:
            torch.save(str(exc), f"{out}/mixed{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_fsdp2_two_ranks_equal_one_process(adaptive, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(WORLD, free_port(), str(tmp_path), adaptive), nprocs=WORLD)
    ref = make_model()
    run(ref, make_opt(ref.parameters(), ref, adaptive))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for p0, p1, q in zip(ranks[0]["params"], ranks[1]["params"], ref.parameters()):
        assert torch.equal(p0, p1)  # every rank gathers the same weights
        torch.testing.assert_close(p0, q.detach(), rtol=1e-5, atol=1e-6)
    # the copy of w is one shard per rank: the ranks together hold exactly one copy
    assert sum(r["backup_bytes"] for r in ranks) == ranks[0]["param_bytes"]
    assert all(r["backup_bytes"] < r["param_bytes"] for r in ranks)
    for r in range(WORLD):
        msg = torch.load(tmp_path / f"mixed{r}.pt")
        assert "sharded (FSDP2) and plain parameters" in msg and "(2, 3)" in msg
