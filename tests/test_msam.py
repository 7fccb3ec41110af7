"""Momentum-SAM (MSAM) and sparse MSAM: against the paper's pseudocode, closed forms on a quadratic,
equivalences (rho = 0, all-True / all-False masks, accumulation) and exact resume."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import MSAM, SAM, SparseMSAM
from sparsam.masks import DynamicMask, FisherMask, ManualMask, RandomMask
from sparsam.optim import sam as sam_module

from .reference import tiny_data, tiny_net


def closure_for(net, x, y, record=None):
    def closure():
        if record is not None:
            record.append([p.detach().clone() for p in net.parameters()])
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    return closure


def batches(n_steps, seed=1, dtype=torch.float64):
    return [tiny_data(n=16, seed=seed + i, dtype=dtype) for i in range(n_steps)]


def run(opt, net, data):
    for x, y in data:
        opt.zero_grad()
        opt.step(closure_for(net, x, y))


def same(a, b):
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), f"{k}: max |diff| {(p - q).abs().max()}"


# ------------------------------------------------------------------------------ the paper's algorithm
def paper_msam(net, data, *, lr, mu, rho, eps=1e-12):
    """Algorithm 1 of Becker et al. (arXiv 2401.12033), line by line: the weights live at w~
    between steps; the last perturbation is removed after the pass, and the next one applied after
    the SGD step. v₀ = 0, so w~₀ = w₀."""
    params = list(net.parameters())
    v = [torch.zeros_like(p) for p in params]
    vnorm = 0.0
    for x, y in data:
        for p in params:
            p.grad = None
        F.cross_entropy(net(x), y).backward()  # gradient at w~_t
        with torch.no_grad():
            g = [p.grad.clone() for p in params]
            for p, vi in zip(params, v):  # w_t = w~_t + rho v_t / ||v_t||
                p.add_(vi, alpha=rho / (vnorm + eps) if vnorm else 0.0)
            for vi, gi in zip(v, g):  # v_{t+1} = mu v_t + g
                vi.mul_(mu).add_(gi)
            for p, vi in zip(params, v):  # w_{t+1} = w_t - lr v_{t+1}
                p.add_(vi, alpha=-lr)
            vnorm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(vi) for vi in v])))
            for p, vi in zip(params, v):  # w~_{t+1} = w_{t+1} - rho v_{t+1} / ||v_{t+1}||
                p.add_(vi, alpha=-rho / (vnorm + eps))
        last = vnorm
    with torch.no_grad():  # back to the unperturbed weights (the authors' move_back_from_momentumAscent)
        for p, vi in zip(params, v):
            p.add_(vi, alpha=rho / (last + eps))
    return net


@pytest.mark.parametrize("foreach", [True, False])
def test_equals_the_papers_pseudocode(foreach):
    data = batches(6)
    net = tiny_net()
    ref = paper_msam(copy.deepcopy(net), data, lr=0.1, mu=0.9, rho=0.3)
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, foreach=foreach)
    run(opt, net, data)
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)  # the reference perturbs by addition
    assert opt.compute == 6.0


def test_closed_form_on_a_quadratic():
    # f(w) = 0.5 wᵀ A w. Step 0 (no momentum): g₀ = A w₀, v₁ = g₀, w₁ = w₀ − η g₀. Step 1: the
    # gradient is taken at w~ = w₁ − ρ v₁/‖v₁‖, v₂ = μ v₁ + A w~, w₂ = w₁ − η v₂.
    torch.manual_seed(0)
    q = torch.randn(5, 5, dtype=torch.float64)
    a = q @ q.T + torch.eye(5, dtype=torch.float64)
    w0 = torch.randn(5, dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    lr, mu, rho = 0.05, 0.9, 0.2
    opt = MSAM([w], torch.optim.SGD, rho=rho, lr=lr, momentum=mu)
    seen = []

    def closure():
        seen.append(w.detach().clone())
        loss = 0.5 * w @ a @ w
        loss.backward()
        return loss

    for _ in range(2):
        opt.zero_grad()
        opt.step(closure)
    v1 = a @ w0
    w1 = w0 - lr * v1
    w_tilde = w1 - rho * v1 / v1.norm()
    w2 = w1 - lr * (mu * v1 + a @ w_tilde)
    assert torch.equal(seen[0], w0)  # the first step perturbs nothing (no momentum yet)
    torch.testing.assert_close(seen[1], w_tilde, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(w.detach(), w2, rtol=1e-12, atol=1e-13)


def test_adamw_perturbs_along_its_first_moment():
    torch.manual_seed(0)
    q = torch.randn(4, 4, dtype=torch.float64)
    a = q @ q.T + torch.eye(4, dtype=torch.float64)
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    opt = MSAM([w], torch.optim.AdamW, rho=0.2, lr=0.01, weight_decay=0.1)
    seen = []

    def closure():
        seen.append(w.detach().clone())
        (0.5 * w @ a @ w).backward()

    opt.step(closure)
    m = opt.state[w]["exp_avg"].clone()  # (1 − β₁) g₀ after the first step
    w1 = w.detach().clone()
    opt.zero_grad()
    opt.step(closure)
    torch.testing.assert_close(seen[1], w1 - 0.2 * m / m.norm(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------ equivalences
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(base):
    data = batches(5)
    net, ref = tiny_net(), tiny_net()
    cls, kw = (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}) if base == "sgd" else (torch.optim.AdamW, {"lr": 0.01})
    opt = MSAM(net.parameters(), cls, rho=0.0, **kw)
    run(opt, net, data)
    run(cls(ref.parameters(), **kw), ref, data)
    same(net, ref)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert not opt._backup.get(p) is not None  # nothing was copied


def test_the_perturbation_is_removed_exactly():
    # Restored by exchange or copy, never by subtraction: w after first_step + restore is w, bitwise.
    for exchange in (True, False):
        net = tiny_net(dtype=torch.float32)
        x, y = tiny_data(dtype=torch.float32)
        opt = MSAM(net.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9, exchange=exchange)
        run(opt, net, [(x, y)])
        before = [p.detach().clone() for p in net.parameters()]
        opt.first_step()
        assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
        assert opt.restore()
        assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def test_the_gradient_is_taken_at_the_perturbed_point_and_the_step_is_taken_from_w():
    # The base step from w with the gradient taken at w~ = w − ρ v/‖v‖: the same as SGD handed that gradient.
    data = batches(3)
    net = tiny_net()
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.4, lr=0.1, momentum=0.9)
    run(opt, net, data[:2])
    shadow = copy.deepcopy(net)
    sgd = torch.optim.SGD(shadow.parameters(), lr=0.1, momentum=0.9)
    sgd.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))  # (load keeps the tensors: copy them)
    v = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in v]))
    tilde = copy.deepcopy(net)
    with torch.no_grad():
        for p, t in zip(tilde.parameters(), v):
            p.sub_(t * (0.4 / (norm + 1e-12)))
    x, y = data[2]
    F.cross_entropy(tilde(x), y).backward()
    for p, t in zip(shadow.parameters(), tilde.parameters()):
        p.grad = t.grad.clone()
    sgd.step()
    opt.zero_grad()
    opt.step(closure_for(net, x, y))
    for p, q in zip(net.parameters(), shadow.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_one_closure_call_per_step_and_compute():
    net = tiny_net()
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    passes = []
    x, y = tiny_data()

    def closure():
        passes.append(opt.current_pass)
        F.cross_entropy(net(x), y).backward()

    for _ in range(3):
        opt.zero_grad()
        opt.step(closure)
    assert passes == [None, None, None] and opt.compute == 3.0
    with pytest.raises(RuntimeError, match="no ascent pass"):
        with opt.ascent_pass():
            pass


def test_accumulation_with_perturbation_equals_one_closure():
    data = batches(4)
    net, ref = tiny_net(), tiny_net()
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    ref_opt = MSAM(ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    for x, y in data:
        (x1, x2), (y1, y2) = x.chunk(2), y.chunk(2)
        opt.zero_grad()
        with opt.perturbation():  # the window's first micro-batch, at the step's w~
            (F.cross_entropy(net(x1), y1) / 2).backward()
        opt.step(lambda x2=x2, y2=y2: (F.cross_entropy(net(x2), y2) / 2).backward())

        def both(x1=x1, x2=x2, y1=y1, y2=y2):
            (F.cross_entropy(ref(x1), y1) / 2).backward()
            (F.cross_entropy(ref(x2), y2) / 2).backward()

        ref_opt.zero_grad()
        ref_opt.step(both)
    same(net, ref)
    assert opt.compute == ref_opt.compute == 4.0


def test_batchnorm_statistics_come_from_the_perturbed_pass():
    # As the paper: the only pass runs at w~ in training mode, so the running statistics are those of w~.
    data = batches(3)
    net = tiny_net(bn=True)
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9)
    run(opt, net, data[:2])
    at_tilde = copy.deepcopy(net)
    opt.first_step()
    with torch.no_grad():
        for p, q in zip(at_tilde.parameters(), net.parameters()):
            p.copy_(q)
    opt.restore()
    x, y = data[2]
    with torch.no_grad():
        at_tilde(x)
    opt.zero_grad()
    opt.step(closure_for(net, x, y))
    assert torch.equal(net[1].running_mean, at_tilde[1].running_mean)
    assert torch.equal(net[1].running_var, at_tilde[1].running_var)


def test_grad_scaler_equals_the_unscaled_step_and_an_overflow_skips():
    data = batches(3, dtype=torch.float32)
    net, ref = tiny_net(dtype=torch.float32), tiny_net(dtype=torch.float32)
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    ref_opt = MSAM(ref.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in data:
        opt.zero_grad()
        opt.step(lambda x=x, y=y: scaler.scale(F.cross_entropy(net(x), y)).backward(), grad_scaler=scaler)
        scaler.update()
        ref_opt.zero_grad()
        ref_opt.step(closure_for(ref, x, y))
    same(net, ref)  # a power-of-two scale: the unscaled gradient is exact
    before = copy.deepcopy(net.state_dict())
    momentum = [opt.state[p]["momentum_buffer"].clone() for p in net.parameters()]

    def overflow():
        loss = F.cross_entropy(net(data[0][0]), data[0][1]) * float("inf")
        scaler.scale(loss).backward()

    opt.zero_grad()
    opt.step(overflow, grad_scaler=scaler)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])  # restored exactly and the step skipped
    assert all(torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(net.parameters(), momentum))


def test_bf16_parameters():
    net = tiny_net(dtype=torch.bfloat16)
    x, y = tiny_data(dtype=torch.bfloat16)
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    run(opt, net, [(x, y)] * 3)
    assert all(torch.isfinite(p).all() and p.dtype == torch.bfloat16 for p in net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    opt.first_step()
    opt.restore()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


# ------------------------------------------------------------------------------ resume
def resume_check(make, n=6):
    data = batches(n)
    net = tiny_net(bn=True)
    straight = copy.deepcopy(net)
    opt = make(straight)
    run(opt, straight, data)
    half = copy.deepcopy(net)
    opt1 = make(half)
    run(opt1, half, data[: n // 2])
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "opt": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = tiny_net(seed=7, bn=True)
    resumed.load_state_dict(saved["model"])
    opt2 = make(resumed)
    opt2.load_state_dict(saved["opt"])
    run(opt2, resumed, data[n // 2 :])
    same(resumed, straight)
    assert opt2.compute == opt.compute
    return opt, opt2


@pytest.mark.parametrize(
    "make",
    [
        lambda m: MSAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, nesterov=True),
        lambda m: MSAM(m.parameters(), torch.optim.AdamW, rho=0.3, lr=0.01),
        lambda m: SparseMSAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9,
                             mask=RandomMask(0.5, seed=3, update_every=2)),
        lambda m: SparseMSAM(m.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, norm="masked",
                             mask=DynamicMask(0.5, 6, update_every=2, seed=3)),
    ],
    ids=["msam-sgd-nesterov", "msam-adamw", "smsam-random", "smsam-dynamic"],
)  # fmt: skip
def test_resume_is_bitwise(make):
    opt, opt2 = resume_check(make)
    if isinstance(opt, SparseMSAM):
        assert opt.masks.keys() == opt2.masks.keys()
        assert all(torch.equal(opt.masks[k], opt2.masks[k]) for k in opt.masks)


def test_state_version_is_checked_and_state_is_sams():
    net = tiny_net()
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
    run(opt, net, batches(2))
    sd = opt.state_dict()
    assert sd["sparsam"]["type"] == "MSAM" and sd["sparsam"]["version"] == sam_module.STATE_VERSION
    bad = {**sd, "sparsam": {**sd["sparsam"], "version": 99}}
    with pytest.raises(ValueError, match="version 99"):
        opt.load_state_dict(bad)
    # The momentum is the base optimizer's state: SAM around the same SGD loads it, and back.
    sam = SAM(tiny_net().parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    sam.load_state_dict(sd)
    opt.load_state_dict(sam.state_dict())


# ------------------------------------------------------------------------------ sparse MSAM
def test_sparse_all_true_is_msam_and_all_false_is_the_base_optimizer():
    data = batches(4)
    nets = [tiny_net() for _ in range(4)]
    kw = {"rho": 0.3, "lr": 0.1, "momentum": 0.9}
    dense = MSAM(nets[0].parameters(), torch.optim.SGD, **kw)
    ones = SparseMSAM(nets[1].parameters(), torch.optim.SGD, **kw)
    ones.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in nets[1].parameters()})
    zeros = SparseMSAM(nets[2].parameters(), torch.optim.SGD, **kw)
    zeros.set_masks({p: torch.zeros_like(p, dtype=torch.bool) for p in nets[2].parameters()})
    sgd = torch.optim.SGD(nets[3].parameters(), lr=0.1, momentum=0.9)
    for opt, net in zip((dense, ones, zeros, sgd), nets):
        run(opt, net, data)
    same(nets[1], nets[0])
    same(nets[2], nets[3])


@pytest.mark.parametrize("norm", ["full", "masked"])
def test_sparse_perturbation_closed_form(norm):
    net = tiny_net()
    params = list(net.parameters())
    opt = SparseMSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, norm=norm)
    g = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(p.shape, generator=g, dtype=torch.float64) < 0.5 for p in params}
    opt.set_masks(masks)
    run(opt, net, batches(2))
    v = [opt.state[p]["momentum_buffer"] for p in params]
    terms = [t * masks[p] if norm == "masked" else t for p, t in zip(params, v)]
    n = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in terms]))
    w = [p.detach().clone() for p in params]
    opt.first_step()
    for p, w0, t in zip(params, w, v):
        expected = torch.where(masks[p], w0 - 0.3 / (n + 1e-12) * t, w0)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-14, atol=1e-15)
        assert torch.equal(p.detach()[~masks[p]], w0[~masks[p]])  # unmasked coordinates are exact
    opt.restore()


def test_fisher_mask_cost_is_counted():
    net = tiny_net()
    x, y = tiny_data(n=16)
    opt = SparseMSAM(
        net.parameters(),
        torch.optim.SGD,
        rho=0.3,
        lr=0.1,
        momentum=0.9,
        mask=FisherMask(0.5, num_samples=8, update_every=2),
        model=net,
        loss_fn=F.cross_entropy,
        data=[(x, y)],
        batch_size=16,
    )
    run(opt, net, [(x, y)] * 3)
    # 3 steps + the first mask (8 / 16) + the update at the start of step 2 (8 / 16)
    assert opt.compute == 3 + 0.5 + 0.5
    with pytest.raises(ValueError, match="batch_size"):
        SparseMSAM(net.parameters(), torch.optim.SGD, momentum=0.9, lr=0.1, mask=FisherMask(0.5, 8), model=net)


def test_dynamic_mask_updates_once_per_step_from_the_passs_gradient():
    net = tiny_net()
    opt = SparseMSAM(
        net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, mask=DynamicMask(0.5, 8, update_every=1)
    )
    data = batches(3)
    run(opt, net, data[:1])
    first = {k: m.clone() for k, m in opt.masks.items()}
    run(opt, net, data[1:2])
    assert any(not torch.equal(first[k], m) for k, m in opt.masks.items())  # updated at step 1
    kept = sum(int(m.sum()) for m in opt.masks.values())
    assert kept == sum(int(m.sum()) for m in first.values())  # the sparsity is conserved


def test_window_micro_batches_share_one_random_mask_update():
    # A mask update runs once per step, not once per micro-batch of an accumulation window.
    net = tiny_net()
    opt = SparseMSAM(
        net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, mask=RandomMask(0.5, seed=1, update_every=1)
    )
    run(opt, net, batches(1))
    x, y = tiny_data()
    opt.zero_grad()
    with opt.perturbation():
        F.cross_entropy(net(x), y).backward()
    inside = {k: m.clone() for k, m in opt.masks.items()}
    opt.step(closure_for(net, x, y))
    assert all(torch.equal(inside[k], m) for k, m in opt.masks.items())


# ------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_value():
    net = tiny_net()
    with pytest.raises(ValueError, match="momentum=0"):
        MSAM(net.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(TypeError, match="RMSprop"):
        MSAM(net.parameters(), torch.optim.RMSprop, lr=0.1)
    with pytest.raises(ValueError, match="adaptive=True"):
        MSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, adaptive=True)
    with pytest.raises(ValueError, match="rho must be"):
        MSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=-1.0)
    with pytest.raises(ValueError, match="form='implicit'"):
        SparseMSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, form="implicit", model=net)
    opt = MSAM(net.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "momentum": 0.5})
    with pytest.raises(ValueError, match="momentum=0"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.float64))], "momentum": 0.0})


def test_exception_in_the_closure_restores_w():
    net = tiny_net()
    opt = MSAM(net.parameters(), torch.optim.SGD, rho=3.0, lr=0.1, momentum=0.9)
    run(opt, net, batches(2))
    before = copy.deepcopy(net.state_dict())

    def boom():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        opt.step(boom)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_manual_masks_keep_their_sparsity():
    net = tiny_net()
    opt = SparseMSAM(net.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9, mask=ManualMask())
    opt.set_masks({p: torch.ones_like(p, dtype=torch.bool) for p in list(net.parameters())[:1]})
    run(opt, net, batches(2))
    assert 0 < opt.sparsity < 1


# ------------------------------------------------------------------------------ preset and registry
def test_msam_preset_carries_the_papers_settings_and_builds():
    import json
    from importlib import resources

    from sparsam.train import build_config, list_presets
    from sparsam.train.build import build_optimizer_and_base

    presets = list_presets()
    msam = presets["cifar100-wrn16-4-msam"].values
    assert (msam["opt"], msam["rho"], msam["lr"], msam["batch_size"], msam["weight_decay"]) == (
        "msam",
        3.0,
        0.5,
        256,
        5e-4,
    )
    assert presets["cifar100-wrn16-4-sam"].values["rho"] == 0.2
    spec = json.loads(resources.files("sparsam").joinpath("configs", "cifar100-wrn16-4.json").read_text())
    for key in ("model", "epochs", "batch_size", "lr", "schedule", "momentum", "weight_decay", "rho", "smsam-f"):
        assert spec["sources"].get(key), key
    model = nn.Linear(3, 2)
    for name in ("cifar100-wrn16-4-msam", "cifar100-wrn16-4-smsam-f"):
        cfg = build_config([("p", {**presets[name].values, "data": "digits"})])
        opt, base = build_optimizer_and_base(
            cfg,
            model.parameters(),
            model=model,
            loss_fn=F.cross_entropy,
            fisher_data=[],
            steps_per_epoch=2,
            total_steps=4,
        )
        assert isinstance(opt, MSAM) and opt.param_groups[0]["rho"] == 3.0 and isinstance(base, torch.optim.SGD)
        assert isinstance(opt, SparseMSAM) == name.endswith("smsam-f")


def test_cli_refuses_what_msam_has_no_use_for():
    from sparsam.train import ConfigError, build_config

    for values, needle in [
        ({"opt": "msam", "adaptive": True}, "no adaptive"),
        ({"opt": "msam", "sam_every": 2}, "--sam-every"),
        ({"opt": "msam", "momentum": 0.0}, "--momentum > 0"),
        ({"opt": "smsam", "mask": "random", "form": "implicit"}, "--form implicit"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            build_config([("t", {"data": "digits", **values})])


def test_figures_draw_msam_in_its_own_colour():
    from sparsam.train import methods as M
    from sparsam.runs.figures import method_style

    msam = method_style({"opt": "msam"})
    sparse = method_style({"opt": "smsam", "mask": "fisher", "sparsity": 0.5})
    assert (msam.label, msam.family) == ("MSAM", "cheaper SAM")
    assert sparse.label == "sparse MSAM (SSAM-F, 50%)"
    others = {method_style(v).color for n, v in M.METHODS.items() if not n.endswith("msam") and "msam-" not in n}
    assert msam.color not in others and sparse.color not in others and msam.color != sparse.color


def test_sparsam_train_counts_one_pass_per_step(tmp_path):
    # --opt msam through the engine: 4 steps of 64 digits, compute 4 (SGD's count); --opt smsam with
    # a Fisher mask of 16 samples adds 16 / 64 for the first mask.
    pytest.importorskip("sklearn")
    import json

    from .test_train_engine import run

    run(tmp_path / "msam", opt="msam")
    run(tmp_path / "smsam", opt="smsam", mask="fisher", num_samples=16)
    computes = {}
    for name in ("msam", "smsam"):
        last = (tmp_path / name / "metrics.jsonl").read_text().strip().splitlines()[-1]
        computes[name] = json.loads(last)["compute"]
    assert computes == {"msam": 4.0, "smsam": 4.25}
