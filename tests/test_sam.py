"""SAM / ASAM / SSAM core: references, closed forms, equivalences, resume, seams, bad input."""

from __future__ import annotations

import copy
import io
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM, no_running_stats
from sparsam.masks import AllOnesMask, RandomMask
from sparsam.optim import _functional as functional

from .reference import quadratic_setup, reference_sam_step, tiny_data, tiny_net

BASES = {
    "sgd_momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.01)),
}


def make_closure(model, x, y):
    # the usual closure pattern (as for LBFGS): clear, forward, backward, return the loss
    def closure():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def params_equal(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def run_two_step(model, opt, x, y, steps):
    for _ in range(steps):
        with opt.ascent_pass():
            F.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with opt.descent_pass():
            F.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)


# ---------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_plain_reference(base, adaptive):
    cls, kw = BASES[base]
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    opt = SAM(m1.parameters(), cls, rho=0.1, adaptive=adaptive, eta=0.02, **kw)
    ref_base = cls(m2.parameters(), **kw)
    for _ in range(4):
        opt.zero_grad()
        opt.step(make_closure(m1, x, y))
        reference_sam_step(
            list(m2.parameters()), ref_base, make_closure(m2, x, y), rho=0.1, adaptive=adaptive, eta=0.02
        )
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("norm", ["full", "masked"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_ssam_matches_plain_reference(norm, adaptive):
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(p.shape, generator=gen) < 0.4 for p in m1.parameters()]
    masks[1] = torch.zeros_like(masks[1])  # one all-False mask
    opt = SSAM(
        m1.parameters(), torch.optim.SGD, rho=0.2, sparsity=0.6, norm=norm, adaptive=adaptive, lr=0.1, momentum=0.9
    )
    opt.set_masks(dict(zip(m1.parameters(), masks)))
    ref_base = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9)
    ref_masks = [m if m.any() else None for m in masks]
    for _ in range(3):
        opt.zero_grad()
        opt.step(make_closure(m1, x, y))
        reference_sam_step(
            list(m2.parameters()),
            ref_base,
            make_closure(m2, x, y),
            rho=0.2,
            adaptive=adaptive,
            masks=ref_masks,
            norm=norm,
        )
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_quadratic_closed_form():
    # f(w) = 0.5 w^T A w: g = A w, e = rho A w / ||A w||, w1 = w - lr * A (w + e).
    a, w0 = quadratic_setup()
    w = nn.Parameter(w0.clone())
    rho, lr = 0.3, 0.05
    opt = SAM([w], torch.optim.SGD, rho=rho, lr=lr)

    def closure():
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    loss = opt.step(closure)
    g = a @ w0
    e = rho * g / g.norm()
    expected = w0 - lr * (a @ (w0 + e))
    torch.testing.assert_close(w.detach(), expected, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(loss.detach(), 0.5 * w0 @ a @ w0)


def test_quadratic_masked_closed_form_norms():
    a, w0 = quadratic_setup(dim=6)
    m = torch.tensor([True, False, True, True, False, False])
    g = a @ w0
    for norm, denom in (("full", g.norm()), ("masked", (g * m).norm())):
        w = nn.Parameter(w0.clone())
        opt = SSAM([w], torch.optim.SGD, rho=0.5, sparsity=0.5, norm=norm, lr=0.0)
        opt.set_masks({w: m})
        (0.5 * w @ a @ w).backward()
        opt.first_step()
        e = w.detach() - w0
        torch.testing.assert_close(e, 0.5 * g * m / denom, rtol=1e-12, atol=1e-13)
        assert torch.all(e[~m] == 0)
        if norm == "masked":
            torch.testing.assert_close(e.norm(), torch.tensor(0.5, dtype=e.dtype))
        else:
            assert e.norm() <= 0.5
        opt.second_step()
        assert torch.equal(w.detach(), w0)  # lr = 0: restored exactly by copy


# ---------------------------------------------------------------------------------------- equivalences
@pytest.mark.parametrize("base", list(BASES))
def test_rho_zero_equals_base_optimizer(base):
    cls, kw = BASES[base]
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    opt = SAM(m1.parameters(), cls, rho=0.0, **kw)
    ref = cls(m2.parameters(), **kw)
    for _ in range(5):
        opt.step(make_closure(m1, x, y))
        ref.zero_grad()
        make_closure(m2, x, y)()
        ref.step()
    assert params_equal(m1, m2)


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_all_ones_mask_equals_sam(norm):
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    sam = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    ssam = SSAM(m2.parameters(), torch.optim.SGD, rho=0.1, mask=AllOnesMask(), norm=norm, lr=0.1, momentum=0.9)
    for _ in range(5):
        sam.step(make_closure(m1, x, y))
        ssam.step(make_closure(m2, x, y))
    assert params_equal(m1, m2)


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_all_zeros_mask_equals_base(norm):
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    ssam = SSAM(m1.parameters(), torch.optim.AdamW, rho=0.1, sparsity=1.0, norm=norm, lr=0.01)
    base = torch.optim.AdamW(m2.parameters(), lr=0.01)
    for _ in range(5):
        ssam.step(make_closure(m1, x, y))
        base.zero_grad()
        make_closure(m2, x, y)()
        base.step()
    assert params_equal(m1, m2)
    assert ssam._backup == {}  # nothing was copied


def test_closure_equals_two_step_api():
    x, y = tiny_data()
    m1, m2 = tiny_net(bn=True), tiny_net(bn=True)
    o1 = SSAM(m1.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, model=m1, lr=0.1, momentum=0.9)
    o2 = SSAM(m2.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, model=m2, lr=0.1, momentum=0.9)
    for _ in range(4):
        o1.step(make_closure(m1, x, y))
    run_two_step(m2, o2, x, y, 4)
    assert params_equal(m1, m2)
    assert all(torch.equal(a, b) for a, b in zip(m1.buffers(), m2.buffers()))


def _awkward_model():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "a": nn.Linear(5, 7),
            "b": nn.Linear(7, 3),
            "unused": nn.Linear(2, 2),  # never gets a gradient
        }
    ).double()
    model.register_parameter("empty", nn.Parameter(torch.zeros(0, 4, dtype=torch.float64)))
    return model


def _awkward_run(foreach, adaptive, masked):
    model = _awkward_model()
    x, y = torch.randn(8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), torch.arange(8) % 3
    groups = [
        {"params": list(model["a"].parameters()) + [model.empty], "rho": 0.05},
        {
            "params": list(model["b"].parameters()) + list(model["unused"].parameters()),
            "rho": 0.2,
            "adaptive": adaptive,
        },
    ]
    base = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if masked:
        opt = SSAM(
            base,
            sparsity=0.5,
            mask=RandomMask(0.5, seed=1, update_every=2),
            norm="masked",
            foreach=foreach,
            model=model,
        )
    else:
        opt = SAM(base, foreach=foreach, model=model)

    def closure():
        model.zero_grad()
        h = torch.tanh(model["a"](x)) + model.empty.sum()
        loss = F.cross_entropy(model["b"](h), y)
        loss.backward()
        return loss

    for step in range(6):
        if step == 3:  # a layer frozen midway
            model["a"].weight.requires_grad_(False)
            model["a"].weight.grad = None
        opt.step(closure)
    return model


@pytest.mark.parametrize("fused_cpu", [True, False])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_foreach_matches_for_loop_bitwise(adaptive, masked, fused_cpu, monkeypatch):
    # fused_cpu=False runs the generic kernels (the accelerators' path) on the CPU
    monkeypatch.setattr(functional, "FUSED_CPU", fused_cpu)
    a = _awkward_run(True, adaptive, masked)
    b = _awkward_run(False, adaptive, masked)
    assert params_equal(a, b)


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_cpu_kernel_matches_generic_kernels(adaptive, masked, monkeypatch):
    # one fused multiply-add rounds once where the generic kernels round e first: equal to rounding
    a = _awkward_run(True, adaptive, masked)
    monkeypatch.setattr(functional, "FUSED_CPU", False)
    b = _awkward_run(True, adaptive, masked)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
def test_fused_cpu_kernel_scales_low_precision_by_the_exact_scale(dtype, masked, monkeypatch):
    # w = 0: dst = e = scale · g, rounded once from the float32 product (as the generic kernels
    # round it); torch.add's alpha was rounded to the tensor's dtype first, biasing every e
    g = torch.randn(4096, generator=torch.Generator().manual_seed(0)).to(dtype)
    scale = torch.tensor(0.0123456789, dtype=torch.float32)
    mask = torch.ones(4096, dtype=torch.bool) if masked else None
    expected = (scale * g.float()).to(dtype)
    for fused in (True, False):
        monkeypatch.setattr(functional, "FUSED_CPU", fused)
        d = torch.empty_like(g)
        functional.add_perturbation(
            [torch.zeros_like(g)], [g], [mask], [d], scale, adaptive=False, eta=0.01, foreach=True
        )
        assert torch.equal(d, expected), fused


@pytest.mark.parametrize("kind", ["sam", "asam", "ssam"])
def test_exchanged_storage_equals_copy_back_bitwise(kind):
    # exchange=True writes w + e into the spare buffer and swaps storages; exchange=False copies w
    # away and back: the same arithmetic, so the same weights, bit for bit
    x, y = tiny_data()
    runs = []
    for exchange in (True, False):
        model = tiny_net(bn=True)
        kw = dict(rho=0.1, lr=0.1, momentum=0.9, model=model, exchange=exchange)
        if kind == "ssam":
            opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=RandomMask(0.5, seed=2), **kw)
        else:
            opt = SAM(model.parameters(), torch.optim.SGD, adaptive=kind == "asam", **kw)
        for _ in range(4):
            opt.zero_grad()
            opt.step(make_closure(model, x, y))
        runs.append(model)
    assert params_equal(*runs)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].buffers(), runs[1].buffers()))


def test_exchange_keeps_the_parameter_object_and_its_storage_outside_the_step():
    model = tiny_net()
    x, y = tiny_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    w = [p.detach().clone() for p in params]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    # pass 2 runs on the spare's storage, holding w + e; the parameters are the same objects
    assert list(model.parameters()) == params
    assert all(p.data_ptr() != q for p, q in zip(params, ptrs))
    assert all(not torch.equal(p, q) for p, q in zip(params, w))
    with pytest.raises(RuntimeError, match="between first_step"):
        opt.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"copying the optimizer between first_step\(\) and second_step\(\)"):
        copy.deepcopy(opt)  # the copy would keep w + e with no w to restore
    F.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert [p.data_ptr() for p in params] == ptrs  # the base step updated w in its own storage
    assert set(opt.state) == set(params)  # momentum is keyed by the same parameters
    assert type(copy.deepcopy(opt)) is SAM  # between steps a copy is fine
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    w = [p.detach().clone() for p in params]
    opt.first_step(zero_grad=True)
    assert opt.restore() is True
    assert [p.data_ptr() for p in params] == ptrs and all(torch.equal(p, q) for p, q in zip(params, w))


class _AliasedWeight(nn.Module):
    # a buffer holding the weight's storage (as a cached view would): it must read w + e in pass 2
    def __init__(self, alias: bool):
        super().__init__()
        torch.manual_seed(3)
        self.lin = nn.Linear(5, 3).double()
        self.alias = alias
        if alias:
            self.register_buffer("w_alias", self.lin.weight.data)

    def forward(self, x):
        w = self.w_alias if self.alias else self.lin.weight.detach()  # no gradient through either
        return x[:, :5] @ w.t() + self.lin(x[:, :5])


@pytest.mark.parametrize("exchange", [True, False])
def test_a_tensor_sharing_the_weights_storage_sees_w_plus_e_in_pass_2(exchange):
    # Reference: the same function reading the weight itself (detached) instead of the alias.
    x, y = tiny_data(n=8)
    runs = []
    for alias in (True, False):
        model = _AliasedWeight(alias)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, exchange=exchange)
        for _ in range(3):
            opt.zero_grad()
            opt.step(make_closure(model, x, y))
        runs.append(model)
    assert params_equal(*runs)
    assert runs[0].w_alias.data_ptr() == runs[0].lin.weight.data_ptr()


def test_a_parameter_listed_twice_in_a_group_is_restored():
    # torch only warns about a duplicate within a group; exchanging it twice would lose w
    x, y = tiny_data(n=8)
    runs = []
    for exchange in (True, False):
        model = tiny_net()
        w = [p.detach().clone() for p in model.parameters()]
        params = list(model.parameters())
        with pytest.warns(UserWarning, match="duplicate"):
            opt = SAM([params[0], *params], torch.optim.SGD, rho=0.5, lr=0.0, exchange=exchange)
        opt.step(make_closure(model, x, y))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))  # lr = 0: back at w
        opt.step(make_closure(model, x, y))
        runs.append(model)
    assert params_equal(*runs)


@pytest.mark.parametrize("exchange", [True, False])
def test_masks_cannot_change_between_the_two_steps(exchange):
    # a mask that leaves a parameter out between the two steps must not drop its kept w, which restore() needs
    model = tiny_net()
    x, y = tiny_data()
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, mask=RandomMask(0.5, seed=1), exchange=exchange)
    opt.init_masks()
    w = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    only_first = {next(iter(opt.masks)): torch.ones_like(next(iter(opt.masks.values())))}
    with pytest.raises(RuntimeError, match="masks cannot change between first_step"):
        opt.set_masks(only_first)
    with pytest.raises(RuntimeError, match="masks cannot change between first_step"):
        opt.init_masks()
    assert opt.restore() is True
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    opt.set_masks(only_first)  # between steps it is fine


@pytest.mark.parametrize("exchange", [True, False])
def test_a_step_inside_one_autocast_region_runs_pass_2_at_w_plus_e(exchange):
    # autocast caches its bfloat16 casts of the weights per parameter until its region ends: a
    # whole step inside one region must run pass 2 at w + e, not on the cached cast of w (which would make it SGD's step)
    x, y = tiny_data(dtype=torch.float32)

    def run(outer):
        model = tiny_net(dtype=torch.float32)
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, exchange=exchange)
        grads = []

        def closure():
            with nullcontext() if outer else torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            grads.append(model[0].weight.grad.clone())
            return loss

        with torch.autocast("cpu", dtype=torch.bfloat16) if outer else nullcontext():
            for _ in range(3):
                opt.zero_grad()
                opt.step(closure)
        return model, grads

    (inner, g_in), (outer, g_out) = run(False), run(True)
    assert not torch.equal(g_in[0], g_in[1])  # pass 2's gradient is another one
    assert all(torch.equal(a, b) for a, b in zip(g_in, g_out))
    assert params_equal(inner, outer)


def test_views_into_a_flat_buffer_are_copied_not_exchanged():
    # Parameters that are views of one flat buffer (as flat-parameter wrappers make them): whoever
    # reads the buffer must see w + e in pass 2, so these are perturbed in place and copied back.
    flat = torch.randn(7 * 5 + 7, dtype=torch.float64)
    lin = nn.Linear(5, 7).double()
    lin.weight = nn.Parameter(flat[:35].view(7, 5))
    lin.bias = nn.Parameter(flat[35:])
    x, y = tiny_data(n=8)
    x = x[:, :5]
    opt = SAM(lin.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    w = flat.clone()
    F.cross_entropy(lin(x), y % 7).backward()
    opt.first_step(zero_grad=True)
    assert lin.weight.data_ptr() == flat.data_ptr()
    assert not torch.equal(flat, w)  # the buffer holds w + e
    torch.testing.assert_close(flat[:35].view(7, 5), lin.weight.detach(), rtol=0, atol=0)
    assert opt.restore() is True
    assert torch.equal(flat, w)


def test_foreach_matches_loop_float32_and_half():
    for dtype in (torch.float32, torch.bfloat16):
        outs = []
        for foreach in (True, False):
            model = tiny_net(dtype=dtype)
            x, y = tiny_data(dtype=dtype)
            opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1, foreach=foreach)
            for _ in range(3):
                opt.step(make_closure(model, x, y))
            outs.append(model)
        assert params_equal(*outs)


# ---------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("kind", ["sam", "ssam"])
def test_resume_is_bitwise(base, kind):
    cls, kw = BASES[base]
    x, y = tiny_data()

    def build(model):
        if kind == "sam":
            return SAM(model.parameters(), cls, rho=0.1, adaptive=True, model=model, **kw)
        return SSAM(model.parameters(), cls, rho=0.1, mask=RandomMask(0.7, seed=5, update_every=3), model=model, **kw)

    straight = tiny_net(bn=True)
    opt_straight = build(straight)
    for _ in range(10):
        opt_straight.step(make_closure(straight, x, y))

    first = tiny_net(bn=True)
    opt = build(first)
    for _ in range(5):
        opt.step(make_closure(first, x, y))
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = tiny_net(seed=123, bn=True)  # different initial weights: everything must come from the checkpoint
    resumed.load_state_dict(ckpt["model"])
    opt2 = build(resumed)
    opt2.load_state_dict(ckpt["opt"])
    for _ in range(5):
        opt2.step(make_closure(resumed, x, y))
    assert params_equal(straight, resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight.buffers(), resumed.buffers()))
    if kind == "ssam":
        assert all(m.dtype == torch.bool for m in opt2.masks.values())
        ms, mr = opt_straight.masks, opt2.masks
        assert ms.keys() == mr.keys() and all(torch.equal(ms[k], mr[k]) for k in ms)


def test_state_dict_holds_base_state_and_no_transient_buffers():
    model = tiny_net()
    x, y = tiny_data()
    opt = SSAM(model.parameters(), torch.optim.AdamW, rho=0.1, sparsity=0.5, lr=0.01)
    opt.step(make_closure(model, x, y))
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["param_groups"][0]["rho"] == 0.1
    assert all(m.dtype == torch.bool for m in sd["sparsam"]["masks"].values())
    flat = repr(sd)
    assert "backup" not in flat
    # a plain optimizer's state dict also loads (migration from a non-SAM run)
    opt.load_state_dict(torch.optim.AdamW(model.parameters(), lr=0.02).state_dict())
    assert opt.param_groups[0]["lr"] == 0.02 and opt.param_groups[0]["rho"] == 0.1
    assert opt.param_groups is opt.base_optimizer.param_groups


# ---------------------------------------------------------------------------------------- groups, ASAM
def test_param_groups_are_shared_with_base_and_scheduler():
    model = tiny_net()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SAM(base, rho=0.05)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = tiny_data()
    opt.step(make_closure(model, x, y))
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    extra = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt.add_param_group({"params": [extra], "rho": 0.5})
    assert (
        len(base.param_groups) == 2 and base.param_groups[1]["rho"] == 0.5 and base.param_groups[1]["adaptive"] is False
    )


@pytest.mark.parametrize("cls, extra", [(SAM, {}), (SSAM, {"sparsity": 0.5})])
def test_two_step_api_with_a_scheduler_raises_no_order_warning(cls, extra):
    # torch's schedulers patch step() to see that the optimizer stepped; first_step/second_step
    # never call step(), which made StepLR warn "lr_scheduler.step() before optimizer.step()".
    import warnings

    model = tiny_net()
    opt = cls(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, **extra)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = tiny_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            F.cross_entropy(model(x), y).backward()
            opt.first_step(zero_grad=True)
            F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
            sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_group_with_rho_zero_is_not_perturbed():
    model = tiny_net()
    x, y = tiny_data()
    first, second = model[0], model[2]
    opt = SAM(
        [{"params": first.parameters(), "rho": 0.0}, {"params": second.parameters(), "rho": 0.3}],
        torch.optim.SGD,
        lr=0.1,
    )
    before = [p.detach().clone() for p in first.parameters()]
    make_closure(model, x, y)()
    g2 = torch.cat([p.grad.reshape(-1) for p in second.parameters()])
    w2 = [p.detach().clone() for p in second.parameters()]
    opt.first_step()
    assert all(torch.equal(p, b) for p, b in zip(first.parameters(), before))
    e = torch.cat([(p - w).reshape(-1) for p, w in zip(second.parameters(), w2)])
    # the norm counts only the perturbed group: ||e|| = rho
    torch.testing.assert_close(e.norm(), torch.tensor(0.3, dtype=e.dtype))
    torch.testing.assert_close(e, 0.3 * g2 / g2.norm())
    opt.second_step()


def test_asam_offset_moves_zero_bias():
    b = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = SAM([b], torch.optim.SGD, rho=0.1, adaptive=True, eta=0.01, lr=0.0)
    (b * torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)).sum().backward()
    opt.first_step()
    assert torch.all(b.detach() != 0)
    opt.second_step()
    assert torch.all(b.detach() == 0)


def test_migration_and_wrapping_forms_agree():
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rho=0.1)
    for _ in range(3):
        o1.step(make_closure(m1, x, y))
        o2.step(make_closure(m2, x, y))
    assert params_equal(m1, m2)


# ---------------------------------------------------------------------------------------- SSAM specifics
def test_untouched_parameters_keep_identity_and_are_not_copied():
    model = tiny_net()
    x, y = tiny_data()
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.0)
    w0 = model[0].weight
    opt.set_masks({model[2].weight: torch.ones_like(model[2].weight, dtype=torch.bool)})
    before = model[0].weight.detach().clone()
    make_closure(model, x, y)()
    opt.first_step()
    assert torch.equal(model[0].weight, before)
    assert set(opt._backup) == {model[2].weight}
    opt.second_step()
    assert model[0].weight is w0


def test_masks_by_name_and_properties():
    model = tiny_net()
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.75, lr=0.1, model=model)
    opt.init_masks()
    masks = opt.masks
    assert set(masks) == {n for n, _ in model.named_parameters()}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == round(0.25 * total)
    opt.set_masks({"0.weight": torch.zeros(8, 6, dtype=torch.bool)})
    assert set(opt.masks) == set()  # all-False masks are dropped: parameter not perturbed
    assert opt.sparsity == 0.75


# ---------------------------------------------------------------------------------------- seams
def test_batchnorm_statistics_come_from_the_clean_pass_only():
    x, y = tiny_data()
    model = tiny_net(bn=True)
    ref = copy.deepcopy(model)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.0, model=model)
    opt.step(make_closure(model, x, y))
    ref(x)  # one clean forward at the same (unchanged, lr=0) weights
    bn, bn_ref = model[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1
    assert bn.track_running_stats


def test_no_running_stats_restores_flag_on_error_and_handles_cumulative_momentum():
    bn = nn.BatchNorm1d(4, momentum=None)
    before = bn.running_mean.clone()
    with pytest.raises(ZeroDivisionError):
        with no_running_stats(bn):
            bn(torch.randn(5, 4))
            1 / 0
    assert bn.track_running_stats and torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 0


def test_gradient_accumulation_matches_full_batch():
    x, y = tiny_data(n=16)
    m1, m2 = tiny_net(), tiny_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)

    def accum_closure():
        m2.zero_grad()
        total = 0.0
        for xb, yb in zip(x.chunk(4), y.chunk(4)):
            loss = F.cross_entropy(m2(xb), yb) / 4
            loss.backward()
            total += loss.detach()
        return total

    for _ in range(3):
        o1.step(make_closure(m1, x, y))
        o2.step(accum_closure)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_clipping_applies_to_descent_gradient():
    x, y = tiny_data()
    m1, m2 = tiny_net(), tiny_net()
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.5, max_grad_norm=0.05)
    ref_base = torch.optim.SGD(m2.parameters(), lr=0.5)
    for _ in range(2):
        o1.step(make_closure(m1, x, y))
        reference_sam_step(list(m2.parameters()), ref_base, make_closure(m2, x, y), rho=0.1, clip=0.05)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_grad_scaler_step_equals_unscaled_step():
    # Scales are powers of two, so unscaling is exact: a finite scaled step equals the fp32 step.
    x, y = tiny_data(dtype=torch.float32)
    m1, m2 = tiny_net(dtype=torch.float32), tiny_net(dtype=torch.float32)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)

    def scaled_closure():
        m2.zero_grad()
        loss = F.cross_entropy(m2(x), y)
        scaler.scale(loss).backward()
        return loss

    for _ in range(3):
        o1.step(make_closure(m1, x, y))
        o2.step(scaled_closure, grad_scaler=scaler)
        scaler.update()
    assert params_equal(m1, m2)


@pytest.mark.parametrize("inf_in_pass", [1, 2])
def test_grad_scaler_skips_step_with_non_finite_gradient(inf_in_pass):
    x, y = tiny_data(dtype=torch.float32)
    model = tiny_net(dtype=torch.float32)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.3, lr=0.1, momentum=0.9, model=model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def train_step(inject):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if inject == 1:
            model[0].weight.grad[0, 0] = float("inf")
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss2 = F.cross_entropy(model(x), y)
        scaler.scale(loss2).backward()
        if inject == 2:
            model[2].bias.grad[0] = float("nan")
        opt.second_step(zero_grad=True)
        scaler.update()

    train_step(0)  # a finite step first, so momentum exists
    w = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.base_optimizer.state_dict())
    scale = scaler.get_scale()
    train_step(inf_in_pass)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    after = opt.base_optimizer.state_dict()
    assert all(
        torch.equal(after["state"][i]["momentum_buffer"], state["state"][i]["momentum_buffer"]) for i in state["state"]
    )
    assert scaler.get_scale() == scale / 2
    train_step(0)  # and training goes on
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), w))


def test_bf16_autocast_close_to_fp32():
    x, y = tiny_data(dtype=torch.float32)
    m1, m2 = tiny_net(dtype=torch.float32), tiny_net(dtype=torch.float32)
    o1 = SAM(m1.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    o2 = SAM(m2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)

    def bf16_closure():
        m2.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m2(x), y)
        loss.backward()
        return loss

    o1.step(make_closure(m1, x, y))
    o2.step(bf16_closure)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=0.05, atol=5e-3)


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_naming_the_value():
    model = tiny_net()
    with pytest.raises(ValueError, match="-0.1"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAM([{"params": model.parameters(), "rho": float("nan")}], torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer_cls"):
        SAM(model.parameters(), rho=0.1)
    for s in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            SSAM(model.parameters(), torch.optim.SGD, sparsity=s, lr=0.1)
    with pytest.raises(ValueError, match="norm"):
        SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, norm="l1", lr=0.1)
    with pytest.raises(ValueError, match="0.3"):
        SSAM(model.parameters(), torch.optim.SGD, sparsity=0.3, mask=RandomMask(0.5), lr=0.1)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1, model=model)
    w = model[0].weight
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        opt.set_masks({w: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(TypeError, match="torch.float32"):
        opt.set_masks({w: torch.ones(8, 6)})
    with pytest.raises(KeyError, match="nope"):
        opt.set_masks({"nope": torch.ones(8, 6, dtype=torch.bool)})
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()
    x, y = tiny_data()
    make_closure(model, x, y)()
    opt.first_step()
    with pytest.raises(RuntimeError, match="twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="w \\+ e"):
        opt.state_dict()
    opt.second_step()
    with pytest.raises(ValueError, match="ascent"):
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, ascent="global")


def test_bad_mask_leaves_existing_masks_in_place():
    model = tiny_net()
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1, model=model)
    opt.init_masks()
    before = {k: v.clone() for k, v in opt.masks.items()}
    with pytest.raises(ValueError):
        opt.set_masks({"0.weight": torch.ones(8, 6, dtype=torch.bool), "0.bias": torch.ones(2, dtype=torch.bool)})
    assert opt.masks.keys() == before.keys() and all(torch.equal(opt.masks[k], before[k]) for k in before)


@pytest.mark.parametrize("exchange", [True, False])
def test_cpu_step_allocates_no_weight_sized_temporary(exchange):
    # After the first step has made the spare buffers, SAM's first_step + second_step write w + e
    # without temporaries: no tensor of a weight's size is allocated per step.
    # Allocations are counted by the profiler, not timed.
    from torch.profiler import ProfilerActivity, profile

    net = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, exchange=exchange)
    opt.first_step()
    opt.second_step()  # makes the spare buffers and the momentum buffers
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.first_step()
        opt.second_step()
    largest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert largest < 64 * 10 * 4  # smaller than the smallest weight matrix: scalars only
