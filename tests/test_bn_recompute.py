"""benchmarks/bn_recompute.py: the BatchNorm statistics it recomputes are the exact statistics of the
images it is given, whatever the layer held before, and the model is left in evaluation mode."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bn_recompute.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_bn_recompute", _PATH)
assert _spec is not None and _spec.loader is not None
bn = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bn
_spec.loader.exec_module(bn)


def test_recompute_bn_gives_the_statistics_of_the_batches():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    layer = model[1]
    # statistics from elsewhere (as MSAM's are: gathered at the perturbed weights)
    layer.running_mean.fill_(5.0)
    layer.running_var.fill_(9.0)
    layer.num_batches_tracked.fill_(100)
    batches = [(torch.randn(8, 3, 2, 2) * (i + 1) + i, torch.zeros(8, dtype=torch.long)) for i in range(3)]

    seen = bn.recompute_bn(model, batches)

    assert seen == 24
    assert not model.training and layer.momentum is None and int(layer.num_batches_tracked) == 3
    with torch.no_grad():
        feats = [conv(x) for x, _ in batches]
    # equal batch sizes: the cumulative average of the batch means is the mean over all images
    want_mean = torch.cat(feats).mean(dim=(0, 2, 3))
    # and of the batches' unbiased variances
    want_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(layer.running_mean, want_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.running_var, want_var, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_right_answers_in_eval_mode():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.BatchNorm1d(2))
    model[0].weight.data = torch.eye(2)
    model.train()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    assert bn.accuracy(model, [(x[:2], y[:2]), (x[2:], y[2:])]) == 0.75
    assert not model.training
