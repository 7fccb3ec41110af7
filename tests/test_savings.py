"""The cheaper ascent pass is exact, and the implicit form's backward is right."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SSAM
from sparsam.masks import AllOnesMask
from sparsam.optim.implicit import masked_input_gradients


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class Probe(nn.Module):
    """Identity whose backward is counted: tells whether autograd reached this depth."""

    def forward(self, x):
        return _CountBackward.apply(x) if x.requires_grad else x


def stage_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 0  stage 1
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),
        Probe(),  # 3: below here only stage 1
        nn.Conv2d(4, 6, 3, padding=1, stride=2),  # 4  stage 2
        nn.BatchNorm2d(6),  # 5
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),  # 9  head
    ).double()


def data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)


def masks_for(model, kind):
    named = dict(model.named_parameters())
    ones = {n: torch.ones_like(p, dtype=torch.bool) for n, p in named.items()}
    if kind == "structured":  # whole tensors, as the authors' structured pattern
        return {n: ones[n] for n in ("4.weight", "9.bias", "1.weight")}
    if kind == "norm_only":  # SAM-ON style
        return {n: ones[n] for n in ("1.weight", "1.bias", "5.weight", "5.bias")}
    if kind == "late_stages":  # whole first stage left out
        g = torch.Generator().manual_seed(7)
        return {
            n: torch.rand(named[n].shape, generator=g) < 0.5 for n in ("4.weight", "4.bias", "5.weight", "9.weight")
        }
    raise ValueError(kind)


def build(model, masks, sparse_ascent):
    opt = SSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        mask=AllOnesMask(),
        norm="masked",
        model=model,
        sparse_ascent=sparse_ascent,
        lr=0.1,
        momentum=0.9,
    )
    opt.set_masks(masks)
    return opt


@pytest.mark.parametrize("kind", ["structured", "norm_only", "late_stages"])
def test_sparse_ascent_perturbation_is_exact(kind):
    x, y = data()
    dense_model, sparse_model = stage_net(), stage_net()
    dense = build(dense_model, masks_for(dense_model, kind), sparse_ascent=False)
    sparse = build(sparse_model, masks_for(sparse_model, kind), sparse_ascent=True)
    for step in range(3):
        for model, opt in ((dense_model, dense), (sparse_model, sparse)):
            opt.zero_grad()
            with opt.ascent_pass():
                F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
        # at w + e the two models must be bitwise equal
        assert all(torch.equal(a, b) for a, b in zip(dense_model.parameters(), sparse_model.parameters()))
        for model, opt in ((dense_model, dense), (sparse_model, sparse)):
            with opt.descent_pass():
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(dense_model.parameters(), sparse_model.parameters()))
    assert all(p.requires_grad for p in sparse_model.parameters())


def test_backward_stops_below_the_lowest_perturbed_layer():
    x, y = data()
    model = stage_net()
    opt = build(model, masks_for(model, "late_stages"), sparse_ascent=True)
    _CountBackward.calls = 0
    with opt.ascent_pass():
        F.cross_entropy(model(x), y).backward()
    assert _CountBackward.calls == 0  # autograd never went below stage 2
    assert model[0].weight.grad is None and model[1].weight.grad is None
    assert model[4].weight.grad is not None
    opt.first_step(zero_grad=True)
    with opt.descent_pass():
        F.cross_entropy(model(x), y).backward()
    assert _CountBackward.calls == 1  # the descent pass is dense
    opt.second_step()
    # and the dense ascent (sparse_ascent=False) reaches the bottom
    opt2 = build(model, masks_for(model, "late_stages"), sparse_ascent=False)
    _CountBackward.calls = 0
    opt2.zero_grad()
    with opt2.ascent_pass():
        F.cross_entropy(model(x), y).backward()
    assert _CountBackward.calls == 1


def test_sparse_ascent_with_full_norm_is_refused():
    model = stage_net()
    with pytest.raises(ValueError, match="norm='masked'"):
        SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, norm="full", sparse_ascent=True, lr=0.1)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, norm="full", lr=0.1)
    assert opt.sparse_ascent is False
    assert SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, norm="masked", lr=0.1).sparse_ascent is True


# ------------------------------------------------------------------------------------------ implicit
def _implicit_vs_reference(layer, x, mask):
    def h(out):  # a loss with a non-trivial upstream gradient
        return (out**2 * torch.linspace(0.5, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)).sum()

    # reference: dY from the dense forward; dX through W*M and dW through W, both by autograd
    w = layer.weight
    xr = x.detach().requires_grad_(True)
    y = layer(xr)
    dy = torch.autograd.grad(h(y), y)[0]
    fwd = (
        (lambda inp, wt: F.linear(inp, wt, layer.bias))
        if isinstance(layer, nn.Linear)
        else (lambda inp, wt: layer._conv_forward(inp, wt, layer.bias))
    )
    dx_ref = torch.autograd.grad(fwd(xr, w * mask), xr, dy)[0]
    dw_ref, db_ref = torch.autograd.grad(fwd(xr, w), (w, layer.bias), dy)

    xi = x.detach().requires_grad_(True)
    with masked_input_gradients(layer, {w: mask}) as n:
        assert n == 1
        yi = layer(xi)
        assert torch.equal(yi, y)  # the forward stays dense
        dx, dw, db = torch.autograd.grad(h(yi), (xi, w, layer.bias))
    torch.testing.assert_close(dx, dx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, db_ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(dx, torch.autograd.grad(fwd(xr, w), xr, dy)[0])  # the mask mattered
    assert "forward" not in vars(layer)  # restored


def test_implicit_linear_matches_masked_weight_reference():
    torch.manual_seed(0)
    layer = nn.Linear(8, 6).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)  # extra leading dims
    mask = torch.rand(6, 8) < 0.5
    _implicit_vs_reference(layer, x, mask)


@pytest.mark.parametrize(
    "cfg", [dict(stride=1, padding=1), dict(stride=2, padding=2, dilation=2), dict(groups=2, padding=1)]
)
def test_implicit_conv_matches_masked_weight_reference(cfg):
    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, **cfg).double()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    mask = torch.rand(layer.weight.shape) < 0.5
    _implicit_vs_reference(layer, x, mask)


def test_implicit_ssam_is_dense_sam_on_masked_backward():
    x, y = data()
    m1, m2 = stage_net(), stage_net()
    masks = {
        n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5
        for i, (n, p) in enumerate(m1.named_parameters())
        if p.dim() > 1
    }
    opt = SSAM(m1.parameters(), torch.optim.SGD, rho=0.1, mask=AllOnesMask(), form="implicit", model=m1, lr=0.1)
    opt.set_masks(masks)
    w0 = [p.detach().clone() for p in m1.parameters()]
    opt.zero_grad()
    with opt.ascent_pass():
        F.cross_entropy(m1(x), y).backward()
    g = [p.grad.clone() for p in m1.parameters()]
    opt.first_step(zero_grad=True)
    # dense perturbation along the implicit gradient: every coordinate with a gradient moves
    n = torch.sqrt(sum((gi**2).sum() for gi in g))
    for p, w, gi in zip(m1.parameters(), w0, g):
        torch.testing.assert_close(p.detach() - w, 0.1 * gi / n, rtol=1e-9, atol=1e-12)
    assert all("forward" not in vars(m) for m in m1.modules())  # only pass 1 is masked
    # the implicit ascent gradient differs from the plain one below the masked layers only
    m2.zero_grad()
    F.cross_entropy(m2(x), y).backward()
    assert torch.equal(m2[9].weight.grad, g[-2])  # the head's dW does not depend on dX masking
    assert not torch.allclose(m2[0].weight.grad, g[0])
    opt.second_step()
