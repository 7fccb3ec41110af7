"""fisher_information and FisherMask against a batch-1 float64 reference; no side effects."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sparsam.masks import FisherMask, MaskContext, fisher_information, select


def _cnn(bn1d=True, seed=0):
    torch.manual_seed(seed)
    layers = [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 8),
    ]
    if bn1d:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.ReLU(), nn.Linear(8, 5)]
    model = nn.Sequential(*layers).double()
    # Non-trivial running statistics, as after some training.
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(7)
    return model.train()


def _batches(n=13, bs=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (n,), generator=g)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def _reference(model, batches, num_samples, bn_stats="running", labels=None):
    """The authors' loop, batch 1, on a copy: F_i = sum_j (d loss_j / d w_i)^2.

    bn_stats="running": normalisation layers in eval mode; "sample": train mode, batch of one."""
    model = copy.deepcopy(model)
    if bn_stats == "running":
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.eval()
    x = torch.cat([b[0] for b in batches])[:num_samples]
    y = torch.cat([b[1] for b in batches])[:num_samples] if labels is None else labels
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for j in range(num_samples):
        model.zero_grad()
        F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]).backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad**2
    return acc


def _assert_close(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype
        torch.testing.assert_close(a[n], b[n], rtol=1e-8, atol=1e-14)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_equals_batch1_reference_running_stats(chunk_size):
    model = _cnn()
    data = _batches()
    got = fisher_information(model, F.cross_entropy, data, 12, chunk_size=chunk_size)
    _assert_close(got, _reference(model, data, 12))


def test_equals_batch1_reference_sample_stats():
    model = _cnn(bn1d=False)
    data = _batches()
    got = fisher_information(model, F.cross_entropy, data, 11, chunk_size=4, bn_stats="sample")
    _assert_close(got, _reference(model, data, 11, "sample"))
    # The two conventions really differ (train-mode BN with per-sample statistics vs running ones).
    other = fisher_information(model, F.cross_entropy, data, 11, chunk_size=4)
    assert not torch.allclose(got["0.weight"], other["0.weight"])


def test_leaves_buffers_modes_and_grads_alone():
    model = _cnn()
    model[4].eval()  # a mixed-mode model
    p0, p1 = model[0].weight, model[0].bias
    p0.grad = torch.randn_like(p0)
    p1.grad = None
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: m.track_running_stats for n, m in model.named_modules() if hasattr(m, "track_running_stats")}
    for bn_stats in ("running", "sample"):
        kw = dict(bn_stats=bn_stats)
        if bn_stats == "sample":
            model[9].eval()  # BatchNorm1d cannot train on a batch of one
        fisher_information(model, F.cross_entropy, _batches(), 8, chunk_size=3, **kw)
        if bn_stats == "sample":
            model[9].train()
        for n, b in model.named_buffers():
            assert torch.equal(b, buffers[n]), n
        for n, p in model.named_parameters():
            assert torch.equal(p, params[n])
            assert (p.grad is None) == (grads[n] is None), n
            if p.grad is not None:
                assert torch.equal(p.grad, grads[n]), n
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert {n: m.track_running_stats for n, m in model.named_modules() if hasattr(m, "track_running_stats")} == (
            flags
        )


def test_true_fisher_samples_labels_from_softmax():
    model = _cnn()
    data = _batches()
    got = fisher_information(
        model, F.cross_entropy, data, 12, chunk_size=12, true_fisher=True, generator=torch.Generator().manual_seed(3)
    )
    # Reference labels: softmax of the (eval-BN) model, one multinomial draw over all 12 rows.
    ref_model = copy.deepcopy(model).eval()
    x = torch.cat([b[0] for b in data])[:12]
    with torch.no_grad():
        probs = torch.softmax(ref_model(x), -1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(3)).squeeze(1)
    _assert_close(got, _reference(model, data, 12, labels=labels))
    again = fisher_information(
        model, F.cross_entropy, data, 12, chunk_size=12, true_fisher=True, generator=torch.Generator().manual_seed(3)
    )
    _assert_close(got, again)


def test_takes_exactly_num_samples_and_no_extra_batch():
    data = _batches(n=20, bs=5)
    pulled = []

    def stream():
        for b in data:
            pulled.append(1)
            yield b

    model = _cnn()
    got = fisher_information(model, F.cross_entropy, stream(), 10)
    assert len(pulled) == 2
    _assert_close(got, _reference(model, data, 10))


def test_params_selection_by_dict_and_names():
    model = _cnn()
    data = _batches()
    ref = _reference(model, data, 6)
    by_dict = fisher_information(model, F.cross_entropy, data, 6, params={"w": model[3].weight, "b": model[11].bias})
    assert list(by_dict) == ["w", "b"]
    torch.testing.assert_close(by_dict["w"], ref["3.weight"], rtol=1e-8, atol=0)
    torch.testing.assert_close(by_dict["b"], ref["11.bias"], rtol=1e-8, atol=0)
    by_name = fisher_information(model, F.cross_entropy, data, 6, params=["8.weight"])
    torch.testing.assert_close(by_name["8.weight"], ref["8.weight"], rtol=1e-8, atol=0)
    with pytest.raises(ValueError, match="not a parameter"):
        fisher_information(model, F.cross_entropy, data, 6, params={"x": nn.Parameter(torch.ones(2))})


class _ItemNet(nn.Module):
    """Data-dependent control flow: vmap cannot run it, the loop fallback must."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3).double()

    def forward(self, x):
        out = self.fc(x)
        return out * 2 if out.sum().item() > 0 else out


def test_falls_back_to_a_loop_with_a_warning():
    torch.manual_seed(0)
    model = _ItemNet()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    with pytest.warns(RuntimeWarning, match="per-sample loop"):
        got = fisher_information(model, F.cross_entropy, [(x, y)], 7, chunk_size=3)
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for j in range(7):
        gs = torch.autograd.grad(F.cross_entropy(model(x[j : j + 1]), y[j : j + 1]), list(model.parameters()))
        for (n, _), g in zip(model.named_parameters(), gs):
            ref[n] += g**2
    _assert_close(got, ref)
    assert all(p.grad is None for p in model.parameters())


def test_bad_inputs():
    model = _cnn()
    with pytest.raises(ValueError, match="ran out after 13 samples; num_samples=20"):
        fisher_information(model, F.cross_entropy, _batches(), 20)
    for bad in (0, -3):
        with pytest.raises(ValueError, match=f"num_samples must be >= 1, got {bad}"):
            fisher_information(model, F.cross_entropy, _batches(), bad)
    data = _batches()
    data[0][0][3, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite .* sample 3"):
        fisher_information(model, F.cross_entropy, data, 8, chunk_size=2)
    with pytest.raises(ValueError, match="mean loss"):
        fisher_information(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), _batches(), 4)
    with pytest.raises(ValueError, match="bn_stats"):
        fisher_information(model, F.cross_entropy, _batches(), 4, bn_stats="batch")
    with pytest.raises(TypeError, match="pairs"):
        fisher_information(model, F.cross_entropy, [torch.ones(3)], 4)


def _ctx(model, data=None):
    return MaskContext(params=dict(model.named_parameters()), model=model, loss_fn=F.cross_entropy, data=data)


def test_fisher_mask_selects_from_fisher():
    model = _cnn()
    data = _batches()
    fm = FisherMask(0.8, num_samples=10, chunk_size=5)
    assert fm.needs_data and not fm.needs_grads
    masks = fm.init(_ctx(model, data))
    expect = select(_reference(model, data, 10), 0.8)
    assert all(torch.equal(masks[n], expect[n]) for n in expect)
    assert all(m.dtype == torch.bool for m in masks.values())
    nm = FisherMask(None, num_samples=10, pattern="2:4")
    assert nm.sparsity == 0.5
    masks = nm.update(_ctx(model, data))
    expect = select(_reference(model, data, 10), None, "2:4")
    assert all(torch.equal(masks[n], expect[n]) for n in expect)


def test_fisher_mask_errors_and_schedule():
    model = _cnn()
    with pytest.raises(ValueError, match="needs data"):
        FisherMask(0.5, num_samples=4).init(_ctx(model))
    with pytest.raises(ValueError, match="model, loss_fn, data"):
        FisherMask(0.5).init(MaskContext(params=dict(model.named_parameters())))
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match="sparsity"):
            FisherMask(bad)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        FisherMask(0.5, num_samples=0)
    with pytest.raises(ValueError, match="n <= m"):
        FisherMask(None, pattern="nm", n=3, m=2)
    fm = FisherMask(0.5, update_every_epochs=2, steps_per_epoch=10)
    assert [t for t in range(50) if fm.wants_update(t)] == [20, 40]
    assert not FisherMask(0.5).wants_update(100)
