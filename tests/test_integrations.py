"""The integrations package itself: optional dependencies stay optional; unwrapping wrappers."""

from __future__ import annotations

import subprocess
import sys

import copy

import pytest
import torch
import torch.nn.functional as F

from sparsam import SAM, SSAM
from sparsam.integrations import unwrap_optimizer

from .reference import tiny_data

HEAVY = ("lightning", "pytorch_lightning", "accelerate", "transformers", "mkdocs")


def test_core_imports_no_framework():
    code = (
        "import sys, sparsam, sparsam.integrations, sparsam.masks, sparsam.optim\n"
        f"heavy = {HEAVY!r}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class Wrapper:  # the attribute each framework uses for the wrapped optimizer
    def __init__(self, inner, attr):
        setattr(self, attr, inner)


def test_unwrap_optimizer():
    p = torch.nn.Parameter(torch.zeros(3))
    sam = SAM([p], torch.optim.SGD, lr=0.1)
    assert unwrap_optimizer(sam) is sam
    assert unwrap_optimizer(Wrapper(sam, "optimizer")) is sam  # Accelerate
    assert unwrap_optimizer(Wrapper(Wrapper(sam, "_optimizer"), "optimizer")) is sam  # Lightning, nested
    ssam = SSAM([p], torch.optim.SGD, sparsity=0.5, lr=0.1)
    assert unwrap_optimizer(Wrapper(ssam, "optimizer")) is ssam
    with pytest.raises(TypeError, match="no sparsam SAM/SSAM optimizer found inside SGD"):
        unwrap_optimizer(torch.optim.SGD([p], lr=0.1))
    with pytest.raises(TypeError, match="inside Wrapper"):
        unwrap_optimizer(Wrapper(torch.optim.SGD([p], lr=0.1), "optimizer"))


# Shared by the DDP tests of the Lightning and Accelerate integrations.
def ddp_reference(net, ascent, steps, world=2, batch=4):
    """SAM (rho = 0.5) with SGD (lr = 0.5) on ``world`` data-parallel ranks, written out in one process.

    Rank r reads samples r, r + world, ... (a DistributedSampler without shuffling). ``local``: rank
    r perturbs with its own gradient; ``sync``: with the rank average. The descent gradients are
    averaged over ranks, then one SGD step."""
    x, y = tiny_data(n=32, dtype=torch.float32)
    net = copy.deepcopy(net)
    params = list(net.parameters())
    base = torch.optim.SGD(params, lr=0.5)

    def grads(xb, yb):
        net.zero_grad()
        F.cross_entropy(net(xb), yb).backward()
        return [p.grad.clone() for p in params]

    for s in range(steps):
        idx = [[r + world * (batch * s + j) for j in range(batch)] for r in range(world)]
        g1 = [grads(x[i], y[i]) for i in idx]
        if ascent == "sync":
            g1 = [[sum(gs) / world for gs in zip(*g1)]] * world
        descent = []
        for r, i in enumerate(idx):
            w = [p.detach().clone() for p in params]
            norm = torch.sqrt(sum((g**2).sum() for g in g1[r]))
            with torch.no_grad():
                for p, g in zip(params, g1[r]):
                    p.add_(0.5 * g / (norm + 1e-12))
            descent.append(grads(x[i], y[i]))
            with torch.no_grad():
                for p, v in zip(params, w):
                    p.copy_(v)
        for p, gs in zip(params, zip(*descent)):
            p.grad = sum(gs) / world
        base.step()
    return net
