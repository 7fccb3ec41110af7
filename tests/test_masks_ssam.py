"""Each mask source driving sparsam.SSAM end to end: the perturbation follows the source's mask."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsam import SSAM
from sparsam.masks import (
    DynamicMask,
    FisherMask,
    NormLayersMask,
    RandomMask,
    fisher_information,
    keep_count,
    select,
)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()


def _data(n_batches=4, bs=6):
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(bs, 3, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (bs,), generator=g))
        for _ in range(n_batches)
    ]


SOURCES = {
    "random": lambda: RandomMask(0.7, seed=2),
    "random-2:4": lambda: RandomMask(None, pattern="2:4"),
    "fisher": lambda: FisherMask(0.6, num_samples=12, chunk_size=5, update_every=2),
    "fisher-2:4": lambda: FisherMask(None, num_samples=12, pattern="2:4"),
    "dynamic": lambda: DynamicMask(0.5, total_steps=8, update_every=2, seed=3),
    "norm": lambda: NormLayersMask(),
}


@pytest.mark.parametrize("kind", list(SOURCES))
def test_ssam_trains_with_source(kind):
    model, data, rho = _model(), _data(), 0.1
    source = SOURCES[kind]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if kind == "fisher":
        fisher_first = select(fisher_information(model, F.cross_entropy, data, 12), 0.6)
    opt = SSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=rho,
        mask=source,
        model=model,
        loss_fn=F.cross_entropy,
        data=data,
        lr=0.1,
    )
    history = []
    for x, y in data:
        with opt.ascent_pass():
            F.cross_entropy(model(x), y).backward()
        w = {n: p.detach().clone() for n, p in model.named_parameters()}
        g = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        opt.first_step(zero_grad=True)
        masks = opt.masks
        history.append(masks)
        gnorm = torch.sqrt(sum((v**2).sum() for v in g.values()))
        for n, p in model.named_parameters():  # norm="full": e = rho * m * g / ||g||
            m = masks.get(n, torch.zeros_like(p, dtype=torch.bool))
            expect = torch.where(m, g[n] * (rho / gnorm), torch.zeros_like(g[n]))
            torch.testing.assert_close(p.detach() - w[n], expect, rtol=1e-9, atol=1e-15)
        with opt.descent_pass():
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    params = dict(model.named_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in params.items())
    full = {n: history[0].get(n, torch.zeros_like(p, dtype=torch.bool)) for n, p in params.items()}
    total = sum(p.numel() for p in params.values())
    kept = sum(int(m.sum()) for m in full.values())
    if kind in ("random", "dynamic"):
        assert kept == keep_count(total, source.sparsity)
    elif kind == "fisher":
        assert all(torch.equal(full[n], fisher_first[n]) for n in params)
        assert kept == keep_count(total, 0.6)
    elif kind.endswith("2:4"):
        w = full["4.weight"]
        assert (w.reshape(3, 16, 4).sum(-1) == 2).all()
        if kind == "random-2:4":
            assert int(w.sum()) == w.numel() // 2
    elif kind == "norm":
        assert {n for n, m in full.items() if m.any()} == {"1.weight", "1.bias"}
        assert all(full[n].all() for n in ("1.weight", "1.bias"))
    if kind == "dynamic":
        flat = [
            torch.cat([h.get(n, torch.zeros_like(p, dtype=torch.bool)).reshape(-1) for n, p in params.items()])
            for h in history
        ]
        assert all(int(f.sum()) == kept for f in flat)
        assert not torch.equal(flat[0], flat[2])  # updated at step 2
        assert torch.equal(flat[0], flat[1])
