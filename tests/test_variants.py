"""SAM sparse in time and in samples, LookSAM and ESAM: closed forms on a quadratic,
equivalences with SAM / SSAM / SGD, exact resume, compute counting and the errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import AllOnesMask, ManualMask, RandomMask
from sparsam.masks.stochastic import StochasticMask
from sparsam.optim.esam import ESAM, FORWARD_COST
from sparsam.optim.looksam import LookSAM, LookSSAM
from sparsam.optim.schedule import SAMSchedule, ScheduledSAM, ScheduledSSAM

RHO, LR, EPS = 0.3, 0.1, 1e-12


# ---------------------------------------------------------------------------------- the quadratic
class Quad(nn.Module):
    """Per-sample loss ℓᵢ(w) = ½ (w − cᵢ)ᵀ A (w − cᵢ) with w = (w1, w2) and A block diagonal, so a
    batch's gradient is A (w − mean c) in closed form."""

    def __init__(self, a1: torch.Tensor, a2: torch.Tensor) -> None:
        super().__init__()
        self.a1, self.a2 = a1, a2
        self.w1 = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.w2 = nn.Parameter(torch.tensor([0.3, 1.5], dtype=torch.float64))

    def forward(self, c: torch.Tensor) -> torch.Tensor:  # per-sample losses
        d1, d2 = self.w1 - c[:, :3], self.w2 - c[:, 3:]
        return 0.5 * ((d1 @ self.a1) * d1).sum(1) + 0.5 * ((d2 @ self.a2) * d2).sum(1)


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=g, dtype=torch.float64)
    return m @ m.T + n * torch.eye(n, dtype=torch.float64)


A1, A2 = _spd(3, 1), _spd(2, 2)
A = torch.block_diag(A1, A2)
C = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def quad() -> Quad:
    return Quad(A1, A2)


def grad(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return A @ (w - c.mean(0))


def losses(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d = w - c
    return 0.5 * ((d @ A) * d).sum(1)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def closure_for(opt: SAM, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None):
    """The closure every caller of the contract writes: batch_index, batch_fraction, per-sample losses."""

    def per_sample(xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
        out = model(xb)
        return out if yb is None else F.cross_entropy(out, yb, reduction="none")

    def closure():
        if opt.current_pass == "measure":
            opt.record_sample_losses(per_sample(x, y))
            return None
        idx = opt.batch_index
        xb, yb = (x, y) if idx is None else (x[idx], None if y is None else y[idx])
        k = math.ceil(opt.batch_fraction * xb.shape[0])
        ls = per_sample(xb[:k], None if yb is None else yb[:k])
        if opt.wants_sample_losses:
            opt.record_sample_losses(ls)
        loss = ls.mean()
        loss.backward()
        return loss

    return closure


def run(opt: SAM, model: nn.Module, steps: int, x: torch.Tensor = C, y: torch.Tensor | None = None) -> None:
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure_for(opt, model, x, y))


def sam_ref(w: torch.Tensor, c_ascent: torch.Tensor, rho: float = RHO, c_descent: torch.Tensor = C) -> torch.Tensor:
    """One SAM step on the quadratic: e = ρ g/‖g‖ (for c = all samples, e = ρAw'/‖Aw'‖ with w' = w − c̄)."""
    g = grad(w, c_ascent)
    e = rho * g / (g.norm() + EPS)
    return w - LR * grad(w + e, c_descent)


# ---------------------------------------------------------------------------------- the exports
def test_sparsam_optim_exports_every_optimizer_class_flat():
    """`from sparsam.optim import X` works for every optimizer class the optim modules define, as
    `torch.optim` exports its optimizers: a new variant's module cannot be forgotten in `__all__`."""
    import importlib
    import pkgutil

    import sparsam.optim

    defined = {}
    for info in pkgutil.iter_modules(sparsam.optim.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"sparsam.optim.{info.name}")
        for name, obj in vars(module).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, torch.optim.Optimizer)
                and obj.__module__ == module.__name__
                and not name.startswith("_")
            ):
                defined[name] = obj
    assert {"SAM", "SSAM", "MSAM", "ESAM", "LookSAM", "ScheduledSAM"} <= defined.keys()  # the walk finds them
    missing = sorted(set(defined) - set(sparsam.optim.__all__))
    assert not missing, f"optimizer classes missing from sparsam.optim.__all__: {missing}"
    assert all(getattr(sparsam.optim, name) is cls for name, cls in defined.items())


# ---------------------------------------------------------------------------------- sparse in time
def test_schedule_every_start_ramp_matches_closed_form():
    total = 12
    model = quad()
    opt = ScheduledSAM(
        model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, every=2, start=0.25, ramp=0.5, total_steps=total
    )
    run(opt, model, total)
    w = torch.cat([quad().w1.detach(), quad().w2.detach()])
    t0, ramp = 3, 6
    for t in range(total):
        if t >= t0 and (t - t0) % 2 == 0:
            w = sam_ref(w, C, rho=RHO * min(1.0, (t - t0 + 1) / ramp))
        else:
            w = w - LR * grad(w, C)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.steps == total
    assert opt.compute == pytest.approx(3 + 2 * 5 + 4)  # 3 before the start, 5 SAM steps (2 each), 4 plain


def test_one_sam_step_on_the_quadratic_is_rho_Aw_over_norm():
    model = quad()
    opt = ScheduledSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR)
    c = torch.zeros(4, 5, dtype=torch.float64)  # c̄ = 0: f(w) = ½ wᵀAw
    w = flat(model)
    e = RHO * (A @ w) / (A @ w).norm()
    run(opt, model, 1, x=c)
    torch.testing.assert_close(flat(model), w - LR * A @ (w + e), rtol=0, atol=1e-13)


def test_trivial_schedule_is_sam_bitwise_and_plain_steps_are_the_base_optimizer():
    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    x, y = torch.randn(8, 4, dtype=torch.float64), torch.arange(8) % 3
    a, b = mlp(), mlp()
    run(SAM(a.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=a), a, 4, x, y)
    run(ScheduledSAM(b.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=b), b, 4, x, y)
    assert torch.equal(flat(a), flat(b))
    # before the SAM phase a step is exactly the base optimizer's
    c, d = mlp(), mlp()
    run(ScheduledSAM(c.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, start=0.5, total_steps=8), c, 3, x, y)
    sgd = torch.optim.SGD(d.parameters(), lr=LR, momentum=0.9)
    for _ in range(3):
        sgd.zero_grad()
        F.cross_entropy(d(x), y, reduction="none").mean().backward()
        sgd.step()
    assert torch.equal(flat(c), flat(d))


def test_schedule_composes_with_ssam_masks():
    model, ref = quad(), quad()
    ones = ScheduledSSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, every=3, mask=AllOnesMask())
    plain = ScheduledSAM(ref.parameters(), torch.optim.SGD, rho=RHO, lr=LR, every=3)
    run(ones, model, 6)
    run(plain, ref, 6)
    assert torch.equal(flat(model), flat(ref))  # SSAM with all-true masks is SAM, step for step
    assert ones._steps == 2  # the mask clock counts perturbing steps


# ---------------------------------------------------------------------------------- with a partial SSAM mask
M1 = torch.tensor([True, False, True])  # w1's coordinates 0 and 2 perturbed; w2 not at all
M = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)


def _mask():
    return ManualMask({"w1": M1})


def _w0() -> torch.Tensor:
    return torch.cat([quad().w1.detach(), quad().w2.detach()])


def test_scheduled_ssam_with_a_partial_mask_late_start_ramp_and_sub_batch_ascent_matches_closed_form():
    model = quad()
    opt = ScheduledSSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=LR,
        model=model,
        mask=_mask(),
        every=2,
        start=0.2,
        ramp=0.5,
        total_steps=7,
        ascent_fraction=0.5,
    )
    run(opt, model, 7)
    w, t0, ramp = _w0(), 1, 4  # t0 = round(0.2 · 7), R = round(0.5 · 7)
    for t in range(7):
        if t >= t0 and (t - t0) % 2 == 0:  # e = ρ' m ⊙ g / ‖g‖ (norm="full"), g from the first 4 of 8
            g = grad(w, C[:4])
            rho = RHO * min(1.0, (t - t0 + 1) / ramp)
            w = w - LR * grad(w + rho * M * g / (g.norm() + EPS), C)
        else:
            w = w - LR * grad(w, C)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(3 * 1.5 + 4)
    assert opt._steps == 3  # SSAM's mask clock counts the perturbing steps only


def test_lookssam_with_a_partial_mask_and_a_sub_batch_ascent_matches_the_papers_rule():
    k, alpha, steps = 3, 0.7, 7
    model = quad()
    opt = LookSSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=RHO,
        lr=LR,
        model=model,
        mask=_mask(),
        k=k,
        alpha=alpha,
        ascent_fraction=0.5,
    )
    run(opt, model, steps)
    w, gv = _w0(), None
    for t in range(steps):
        if t % k == 0:  # g_s is SSAM's gradient; g the sub-batch gradient, as LookSAM's pass 1 has it
            g = grad(w, C[:4])
            gs = grad(w + RHO * M * g / (g.norm() + EPS), C)
            gv = gs - (g @ gs) / (g @ g) * g
            w = w - LR * gs
        else:
            g = grad(w, C)
            w = w - LR * (g + alpha * g.norm() / (gv.norm() + EPS) * gv)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(3 * 1.5 + 4)


def test_esam_with_another_mask_source_a_schedule_and_data_selection_matches_closed_form():
    model = quad()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, model=model, mask=_mask(), gamma=0.5, every=2)
    assert opt.beta == 1.0  # no SWP rescaling with another source
    run(opt, model, 6)
    w = _w0()
    for t in range(6):
        if t % 2 == 0:  # norm="masked" (ESAM's): e = ρ m ⊙ g / ‖m ⊙ g‖; pass 2 on the 4 whose loss rose most
            gm = M * grad(w, C)
            e = RHO * gm / (gm.norm() + EPS)
            rise = losses(w + e, C) - losses(w, C)
            idx = torch.topk(rise, 4).indices.sort().values
            w = w - LR * grad(w + e, C[idx])
        else:
            w = w - LR * grad(w, C)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(3 * (1 + 1 / 3 + 0.5) + 3)


# ---------------------------------------------------------------------------------- sparse in samples
def test_ascent_fraction_uses_the_first_part_of_the_batch():
    model = quad()
    opt = ScheduledSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, ascent_fraction=0.25)
    run(opt, model, 3)
    w = torch.cat([quad().w1.detach(), quad().w2.detach()])
    for _ in range(3):
        w = sam_ref(w, C[:2])  # ceil(0.25 * 8) = 2 samples define e; pass 2 uses all 8
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(3 * 1.25)


# ---------------------------------------------------------------------------------- LookSAM
def test_looksam_matches_the_papers_rule():
    k, alpha, steps = 3, 0.7, 8
    model = quad()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=k, alpha=alpha)
    run(opt, model, steps)
    w = torch.cat([quad().w1.detach(), quad().w2.detach()])
    gv = None
    for t in range(steps):
        g = grad(w, C)
        if t % k == 0:
            gs = grad(w + RHO * g / (g.norm() + EPS), C)
            gv = gs - (g @ gs) / (g @ g) * g  # g_s minus its projection on g
            w = w - LR * gs
        else:
            w = w - LR * (g + alpha * g.norm() / (gv.norm() + EPS) * gv)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    assert opt.compute == pytest.approx(3 * 2 + 5)


def test_looksam_per_tensor_projects_and_rescales_each_tensor_on_its_own():
    k, alpha, steps = 3, 0.7, 8
    model = quad()
    opt = LookSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=k, alpha=alpha, per_tensor=True)
    run(opt, model, steps)
    parts = (slice(0, 3), slice(3, 5))  # w1, w2
    w, gv = _w0(), torch.zeros(5, dtype=torch.float64)
    for t in range(steps):
        g = grad(w, C)
        if t % k == 0:
            gs = grad(w + RHO * g / (g.norm() + EPS), C)  # the ascent is SAM's (global norm)
            for s in parts:
                gv[s] = gs[s] - (g[s] @ gs[s]) / (g[s] @ g[s]) * g[s]
            w = w - LR * gs
        else:
            step = g.clone()
            for s in parts:
                step[s] += alpha * g[s].norm() / (gv[s].norm() + EPS) * gv[s]
            w = w - LR * step
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    glob = quad()
    run(LookSAM(glob.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=k, alpha=alpha), glob, steps)
    assert not torch.allclose(flat(glob), w)  # the global rule is a different trajectory here
    assert "per_tensor=True" in repr(opt)
    with pytest.raises(TypeError, match="per_tensor must be a bool, got 'yes'"):
        LookSAM(quad().parameters(), torch.optim.SGD, per_tensor="yes")


def test_looksam_k1_is_sam_and_lookssam_with_all_true_masks_is_looksam():
    a, b = quad(), quad()
    run(LookSAM(a.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=1), a, 4)
    run(SAM(b.parameters(), torch.optim.SGD, rho=RHO, lr=LR), b, 4)
    assert torch.equal(flat(a), flat(b))
    c, d = quad(), quad()
    run(LookSSAM(c.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=3, mask=AllOnesMask()), c, 7)
    run(LookSAM(d.parameters(), torch.optim.SGD, rho=RHO, lr=LR, k=3), d, 7)
    assert torch.equal(flat(c), flat(d))


def test_lookssam_refuses_what_changes_pass_1s_gradient():
    params = list(quad().parameters())
    with pytest.raises(ValueError, match="sparse_ascent=True"):
        LookSSAM(params, torch.optim.SGD, lr=LR, mask=RandomMask(0.5), norm="masked", sparse_ascent=True)
    with pytest.raises(ValueError, match="form='implicit'"):
        LookSSAM(params, torch.optim.SGD, lr=LR, mask=RandomMask(0.5), form="implicit", model=quad())
    # norm="masked" turns SSAM's sparse ascent on by default; LookSSAM keeps pass 1 whole
    assert not LookSSAM(params, torch.optim.SGD, lr=LR, mask=RandomMask(0.5), norm="masked").sparse_ascent


def test_train_cli_lookssam_with_a_fisher_mask(tmp_path):
    """``sparsam train --opt lookssam --mask fisher`` end to end on 128 digits: the method's name
    and label, a LookSSAM with Fisher masks in the checkpoint, 1 + 1/k passes per step."""
    pytest.importorskip("sklearn")
    import json

    from sparsam.__main__ import main

    out = tmp_path / "run"
    argv = ["train", "--data", "digits", "--opt", "lookssam", "--mask", "fisher", "--look-k", "2"]
    argv += ["--num-samples", "16", "--train-subset", "128", "--test-subset", "30", "--batch-size", "32"]
    argv += ["--epochs", "1", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    assert (cfg["opt"], cfg["mask"], cfg["look_k"]) == ("lookssam", "fisher", 2)
    assert json.loads((out / "summary.json").read_text())["method"] == "lookssam-f"
    sd = torch.load(out / "checkpoint.pt", weights_only=True)["optimizer"]["sparsam"]
    assert sd["type"] == "LookSSAM" and sd["mask_source_type"] == "FisherMask" and sd["masks"]
    assert sd["look_gv"] and sd["schedule_step"] == 4
    assert sd["compute"] == pytest.approx(2 * 2 + 2)  # 4 steps, k = 2: two SAM steps (2 passes), two with one


# ---------------------------------------------------------------------------------- ESAM
def _swp_draws(seed: int, beta: float, n_draws: int) -> list[list[bool]]:
    g = torch.Generator().manual_seed(seed)
    return [[bool(torch.rand((), generator=g) < beta) for _ in range(2)] for _ in range(n_draws)]


@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_esam_matches_swp_and_sds_by_hand(gamma):
    beta, seed, steps = 0.5, 7, 6
    model = quad()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, beta=beta, gamma=gamma, seed=seed, model=model)
    run(opt, model, steps)
    w = torch.cat([quad().w1.detach(), quad().w2.detach()])
    blocks = [slice(0, 3), slice(3, 5)]
    draws = _swp_draws(seed, beta, steps)  # step t perturbs with draw t (drawn at the end of step t-1)
    assert {tuple(d) for d in draws} >= {(True, True), (False, False), (False, True)}  # every case occurs
    for t in range(steps):
        g = grad(w, C)
        m = torch.zeros_like(w)
        for keep, blk in zip(draws[t], blocks):
            m[blk] = float(keep)
        gm = m * g
        e = (RHO / beta) * gm / (gm.norm() + EPS) if gm.norm() > 0 else torch.zeros_like(w)
        if gamma < 1:
            rise = losses(w + e, C) - losses(w, C)
            chosen = torch.topk(rise, int(gamma * len(C))).indices
            w = w - LR * grad(w + e, C[chosen])
        else:
            w = w - LR * grad(w + e, C)
    torch.testing.assert_close(flat(model), w, rtol=0, atol=1e-12)
    per_step = 1 + (1.0 if gamma == 1 else gamma + FORWARD_COST)
    assert opt.compute == pytest.approx(steps * per_step)


def test_esam_pass_one_skips_unperturbed_tensors():
    model = quad()
    opt = ESAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, beta=0.5, seed=7, gamma=1.0, model=model)
    seen = []

    def closure():
        loss = model(C).mean()
        loss.backward()
        if opt.current_pass == "ascent":
            seen.append([p.grad is not None for p in model.parameters()])
        return loss

    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        opt.step(closure)
    # a tensor the step's draw leaves out gets no ascent gradient (all left out: pass 1 stays as it is)
    assert seen == [d if any(d) else [True, True] for d in _swp_draws(7, 0.5, 4)]
    assert any(d != [True, True] for d in seen)


def test_esam_with_another_mask_source_and_errors():
    model = quad()
    ESAM(model.parameters(), torch.optim.SGD, lr=LR, mask=RandomMask(0.5), gamma=0.5)
    with pytest.raises(ValueError, match="beta=0.6"):
        ESAM(model.parameters(), torch.optim.SGD, lr=LR, mask=RandomMask(0.5), beta=0.6)
    with pytest.raises(ValueError, match=r"gamma=0.5.*ascent_fraction=0.25"):
        ESAM(model.parameters(), torch.optim.SGD, lr=LR, gamma=0.5, ascent_fraction=0.25)
    with pytest.raises(ValueError, match="gamma"):
        ESAM(model.parameters(), torch.optim.SGD, lr=LR, gamma=0.0)
    opt = ESAM(model.parameters(), torch.optim.SGD, lr=LR, gamma=0.5, model=model)
    w = flat(model)

    def unaware():
        loss = model(C).mean()
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match=r"gamma=0.5.*record_sample_losses"):
        opt.step(unaware)
    assert torch.equal(flat(model), w)  # nothing moved


def test_constructor_errors_name_the_values():
    params = quad().parameters()
    with pytest.raises(ValueError, match="every=2"):
        LookSAM(params, torch.optim.SGD, lr=LR, k=5, every=2)
    with pytest.raises(ValueError, match="total_steps"):
        SAMSchedule(start=0.5)
    with pytest.raises(ValueError, match="every"):
        SAMSchedule(every=0)
    with pytest.raises(ValueError, match="ascent_fraction"):
        ScheduledSAM(quad().parameters(), torch.optim.SGD, lr=LR, ascent_fraction=0.0)
    with pytest.raises(ValueError, match="beta"):
        StochasticMask(1.5)


def test_stochastic_mask_granularities():
    from sparsam.masks.base import MaskContext

    params = {"a": torch.zeros(50, 40), "b": torch.zeros(30)}
    ctx = MaskContext(params=params, model=None, loss_fn=None, data=None, step=0, grads={}, masks={})
    src = StochasticMask(0.3, granularity="coordinate", seed=1)
    m = src.init(ctx)
    assert 0.2 < m["a"].float().mean() < 0.4
    tens = StochasticMask(0.5, seed=2)
    for _ in range(5):
        for mk in tens.update(ctx).values():
            assert bool(mk.all()) or not bool(mk.any())
    state = tens.state_dict()
    with pytest.raises(ValueError, match="seed: saved 2, built 99"):  # the built source's settings are used
        StochasticMask(0.5, seed=99).load_state_dict(state)
    again = StochasticMask(0.5, seed=2)
    again.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(tens.update(ctx).values(), again.update(ctx).values()))


# ---------------------------------------------------------------------------------- exact resume
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()


FACTORIES = {
    "scheduled": lambda m: ScheduledSAM(
        m.parameters(),
        torch.optim.SGD,
        lr=LR,
        momentum=0.9,
        model=m,
        every=2,
        start=0.2,
        ramp=0.5,
        total_steps=10,
        ascent_fraction=0.5,
    ),
    "scheduled-ssam": lambda m: ScheduledSSAM(
        m.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=m, every=3, sparsity=0.5
    ),
    "looksam": lambda m: LookSAM(m.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=m, k=3),
    "lookssam": lambda m: LookSSAM(m.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=m, k=3, sparsity=0.5),
    "esam": lambda m: ESAM(m.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=m, beta=0.5, gamma=0.5),
    "esam-coordinate": lambda m: ESAM(
        m.parameters(), torch.optim.SGD, lr=LR, momentum=0.9, model=m, beta=0.5, granularity="coordinate", gamma=0.5
    ),
    "esam-random": lambda m: ESAM(
        m.parameters(),
        torch.optim.SGD,
        lr=LR,
        momentum=0.9,
        model=m,
        mask=RandomMask(0.5, update_every=2),
        gamma=0.5,
        every=2,
    ),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_exact_resume(name):
    gen = torch.Generator().manual_seed(5)
    batches = [
        (torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen))
        for _ in range(10)
    ]

    def steps(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            opt.step(closure_for(opt, model, x, y))

    a = _mlp()
    oa = FACTORIES[name](a)
    steps(a, oa, batches)
    b = _mlp()
    ob = FACTORIES[name](b)
    steps(b, ob, batches[:5])
    buf = io.BytesIO()
    torch.save({"model": b.state_dict(), "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    c = _mlp()
    oc = FACTORIES[name](c)
    c.load_state_dict(saved["model"])
    oc.load_state_dict(saved["opt"])
    steps(c, oc, batches[5:])
    assert torch.equal(flat(a), flat(c))
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), c.state_dict().values()))
    assert oa.compute == oc.compute
    for p, q in zip(a.parameters(), c.parameters()):
        assert torch.equal(oa.state[p]["momentum_buffer"], oc.state[q]["momentum_buffer"])


def test_compute_is_counted_and_saved():
    m = quad()
    opt = SAM(m.parameters(), torch.optim.SGD, lr=LR)
    run(opt, m, 3)
    assert opt.compute == 6.0
    sd = opt.state_dict()
    assert sd["sparsam"]["compute"] == 6.0
    m2 = quad()
    opt2 = SSAM(m2.parameters(), torch.optim.SGD, lr=LR, sparsity=0.5)
    assert opt2.compute == 0.0
    opt3 = SAM(quad().parameters(), torch.optim.SGD, lr=LR)
    opt3.load_state_dict(sd)
    assert opt3.compute == 6.0


# ---------------------------------------------------------------------------------- sparsam train
ENGINE_CASES = {
    "sam-every2-asc": {"opt": "sam", "sam_every": 2, "ascent_fraction": 0.25, "sam_start": 0.25, "rho_ramp": 0.25},
    "ssam-every2": {"opt": "ssam", "mask": "random", "sam_every": 2},
    "looksam": {"opt": "looksam", "look_k": 2},
    "lookssam-f": {"opt": "lookssam", "mask": "fisher", "look_k": 2, "num_samples": 16},
    "esam": {"opt": "esam", "accum": 2},
}


def _checkpoint(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("name", sorted(ENGINE_CASES))
def test_train_cli_runs_resumes_bitwise_and_records_compute(name, tmp_path):
    pytest.importorskip("sklearn")
    from sparsam.train import train

    from .test_train_engine import metrics, tiny

    over = {"epochs": 2, **ENGINE_CASES[name]}
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny(straight, **over), quiet=True)
    train(tiny(split, stop_after=1, **over), quiet=True)
    train(tiny(split, **over), resume=True, quiet=True)
    a, b = _checkpoint(straight), _checkpoint(split)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    rows = metrics(straight)
    assert [r["compute"] for r in rows] == [r["compute"] for r in metrics(split)]
    steps = rows[-1]["step"]
    assert 0 < rows[0]["compute"] < rows[1]["compute"]
    # fewer passes than SAM's 2 per step, more than SGD's 1 (ESAM with accumulation: 1 + 1/3 + 0.5)
    assert steps < rows[-1]["compute"] < 2 * steps
    assert a["optimizer"]["sparsam"]["compute"] == rows[-1]["compute"]


def test_train_cli_sgd_compute_is_one_per_step_and_flags_are_checked(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from sparsam.__main__ import main
    from sparsam.train import train

    from .test_train_engine import metrics, tiny

    train(tiny(tmp_path / "sgd", epochs=1), quiet=True)
    row = metrics(tmp_path / "sgd")[0]
    assert row["compute"] == row["step"]
    for argv, needle in [
        (["--opt", "sgd", "--sam-every", "2"], "--opt sgd"),
        (["--opt", "esam", "--ascent-fraction", "0.5"], "--ascent-fraction 0.5"),
        (["--opt", "looksam", "--sam-every", "3"], "--sam-every 3"),
        (["--opt", "lookssam", "--sam-every", "2"], "--sam-every 2"),
        (["--opt", "lookssam", "--sparse-ascent", "--norm", "masked"], "--sparse-ascent"),
        (["--opt", "lookssam", "--form", "implicit"], "--form implicit"),
        (["--opt", "sam", "--ascent-fraction", "1.5"], "--ascent-fraction"),
    ]:
        assert main(["train", "--data", "digits", "--out", str(tmp_path / "x"), *argv]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1


def test_presets_carry_the_papers_settings_with_sources():
    import json
    from importlib import resources

    from sparsam.train import build_config, list_presets

    presets = list_presets()
    esam = presets["cifar10-resnet18-cheap-esam"].values
    assert (esam["opt"], esam["esam_beta"], esam["esam_gamma"], esam["rho"], esam["lr"], esam["weight_decay"]) == (
        "esam",
        0.6,
        0.5,
        0.05,
        0.05,
        1e-3,
    )
    look = presets["cifar10-resnet18-cheap-looksam"].values
    assert (look["opt"], look["look_k"], look["look_alpha"]) == ("looksam", 5, 0.7)
    assert presets["cifar10-resnet18-cheap-sam-every2"].values["sam_every"] == 2
    spec = json.loads(resources.files("sparsam").joinpath("configs", "cifar10-resnet18-cheap.json").read_text())
    for key in ("esam_beta", "esam_gamma", "look_k", "look_alpha", "sam_every", "sam_start", "ascent_fraction"):
        assert spec["sources"].get(key), key
    for name, p in presets.items():
        if "cheap" in name:
            build_config([("p", {**p.values, "data": "digits"})])


def test_report_shows_compute_and_plots_accuracy_against_it(tmp_path):
    pytest.importorskip("sklearn")
    from sparsam.cli.report import write_runs_report
    from sparsam.train import train

    from .test_train_engine import tiny

    train(tiny(tmp_path / "runs" / "sgd", epochs=2), quiet=True)
    train(tiny(tmp_path / "runs" / "every2", epochs=2, opt="sam", sam_every=2), quiet=True)
    plots = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots = False
    table = write_runs_report([str(tmp_path / "runs")], tmp_path / "rep", plots=plots)
    head, _, *rows = table.strip().splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows}
    i, j = cols.index("Compute (SGD steps)"), cols.index("Compute vs SGD")
    steps = int(cells["SGD"][i])
    assert steps > 0 and float(cells["SAM"][i]) == 1.5 * steps  # every other step a SAM step: 1.5 passes per step
    assert cells["SAM"][j] == "1.50x" and cells["SGD"][j] == "1.00x"
    assert "compute_sgd_steps" in (tmp_path / "rep" / "report.csv").read_text()
    if plots:
        assert (tmp_path / "rep" / "acc_vs_compute.png").stat().st_size > 0


@pytest.mark.parametrize(
    "flags",
    [
        ["--opt", "looksam", "--look-k", "2"],  # g_v from each rank's local ascent gradient: averaged over the ranks
        ["--opt", "sam", "--ascent-fraction", "0.25", "--sam-every", "2"],  # each rank's first quarter, ascent local
        ["--opt", "esam"],  # per-rank data selection, SWP masks from the same generator
    ],
)
def test_torchrun_two_ranks_end_identical(flags, tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    pytest.importorskip("sklearn")
    from .launch import torchrun_sparsam

    out = tmp_path / "ddp"
    torchrun_sparsam(
        "train",
        *flags,
        "--train-subset",
        "256",
        "--test-subset",
        "64",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        env={"SPARSAM_DEBUG_RANK_DUMP": "1"},
    )
    r0, r1 = (torch.load(out / "debug" / f"rank{r}.pt", weights_only=True) for r in range(2))
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
