"""Issue 13, optimizer level: loading is checked and all-or-nothing, an interrupted step never
leaves the weights at w + e, a skipped GradScaler step does not move SSAM's mask schedule, and
masks set by hand are a mask source of their own (cases 7, 8, 9, 10, 11, 17)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import ManualMask, MaskSource, RandomMask

from .reference import tiny_data, tiny_net


def closure_for(model, x, y, *, fail_on_call=None, exc=KeyboardInterrupt):
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if calls["n"] == fail_on_call:
            raise exc("interrupted")
        return loss

    return closure


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for p, q in zip(a, b))


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def trained_ssam(steps=2, **kw):
    model = tiny_net()
    x, y = tiny_data()
    opt = SSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        lr=0.1,
        momentum=0.9,
        model=model,
        mask=kw.pop("mask", RandomMask(0.5, seed=3)),
        **kw,
    )
    for _ in range(steps):
        opt.step(closure_for(model, x, y))
    return model, opt


def snapshot(opt):
    """Everything a load could change: base state, groups, SSAM's masks and clock."""
    sd = copy.deepcopy(opt.base_optimizer.state_dict())
    extra = {}
    if isinstance(opt, SSAM):
        extra = {
            "masks": {k: v.clone() for k, v in opt.masks.items()},
            "steps": opt._steps,
            "ready": opt._masks_ready,
            "source": copy.deepcopy(opt.mask_source.state_dict()),
        }
    return sd, extra


def assert_unchanged(opt, snap):
    sd, extra = snap
    now = opt.base_optimizer.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            assert torch.equal(now["state"][i][k], v), (i, k)
    if extra:
        assert opt.masks.keys() == extra["masks"].keys()
        assert all(torch.equal(opt.masks[k], extra["masks"][k]) for k in extra["masks"])
        assert opt._steps == extra["steps"] and opt._masks_ready == extra["ready"]


# ------------------------------------------------------------------------------------- case 7
def test_sam_refuses_an_ssam_state_that_holds_masks():
    _, ssam = trained_ssam()
    model = tiny_net()
    sam = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    snap = snapshot(sam)
    with pytest.raises(ValueError, match="SSAM.*mask"):
        sam.load_state_dict(roundtrip(ssam.state_dict()))
    assert_unchanged(sam, snap)


@pytest.mark.parametrize("drop", ["masks", "mask_source"])
def test_ssam_refuses_a_state_without_masks_or_mask_source(drop):
    _, ssam = trained_ssam()
    sd = roundtrip(ssam.state_dict())
    del sd["sparsam"][drop]
    _, target = trained_ssam(steps=1)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=drop):
        target.load_state_dict(sd)
    assert_unchanged(target, snap)


def test_ssam_refuses_a_state_of_another_mask_source():
    _, ssam = trained_ssam()
    model = tiny_net()
    other = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model, mask=ManualMask())
    with pytest.raises(ValueError, match="RandomMask.*ManualMask"):
        other.load_state_dict(roundtrip(ssam.state_dict()))


# ------------------------------------------------------------------------------------- case 8
@pytest.mark.parametrize("bad", ["norm", "mask_shape", "mask_index", "source_state"])
def test_a_failed_load_changes_nothing(bad):
    _, src = trained_ssam(steps=3)
    sd = roundtrip(src.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # a visible difference if the load got halfway
    if bad == "norm":
        sd["sparsam"]["norm"] = "masked"
    elif bad == "mask_shape":
        sd["sparsam"]["masks"][0] = torch.ones(2, 2, dtype=torch.bool)
    elif bad == "mask_index":
        sd["sparsam"]["masks"][99] = torch.ones(2, 2, dtype=torch.bool)
    else:
        sd["sparsam"]["mask_source"] = {"sparsity": 0.5}  # no generator state: fails inside the source
    _, target = trained_ssam(steps=1)
    snap = snapshot(target)
    with pytest.raises((ValueError, KeyError, TypeError)):
        target.load_state_dict(sd)
    assert target.param_groups[0]["lr"] == 0.1
    assert_unchanged(target, snap)
    assert target.param_groups is target.base_optimizer.param_groups


# ------------------------------------------------------------------------------------- case 9
@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("kind", ["sam", "ssam"])
def test_an_exception_in_pass_two_restores_w(kind, exc):
    model = tiny_net(bn=False)
    x, y = tiny_data()
    if kind == "sam":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, model=model)
    else:
        opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, lr=0.1, momentum=0.9, model=model)
    opt.step(closure_for(model, x, y))
    w = weights(model)
    with pytest.raises(exc):
        opt.step(closure_for(model, x, y, fail_on_call=2, exc=exc))
    assert same(weights(model), w)  # exactly w, not w + e
    sd = opt.state_dict()  # and the state can be saved
    assert sd["state"]
    # training goes on, and matches an optimizer that never saw the interruption
    ref_model = tiny_net(bn=False)
    ref_model.load_state_dict(model.state_dict())
    ref_cls = SAM if kind == "sam" else SSAM
    extra = {} if kind == "sam" else {"sparsity": 0.5}
    ref = ref_cls(ref_model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, model=ref_model, **extra)
    ref.load_state_dict(roundtrip(sd))
    opt.step(closure_for(model, x, y))
    ref.step(closure_for(ref_model, x, y))
    assert same(weights(model), weights(ref_model))


def test_restore_undoes_first_step_exactly():
    model = tiny_net()
    x, y = tiny_data()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    w = weights(model)
    F.cross_entropy(model(x), y).backward()
    opt.first_step(zero_grad=True)
    assert not same(weights(model), w)
    assert opt.restore() is True
    assert same(weights(model), w)
    assert opt.restore() is False  # nothing left to undo
    opt.state_dict()
    with pytest.raises(RuntimeError, match="before first_step"):
        opt.second_step()


def test_perturbed_context_equals_two_step_api_and_restores_on_error():
    x, y = tiny_data()
    m1, m2 = tiny_net(bn=True), tiny_net(bn=True)
    o1 = SSAM(m1.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, model=m1, lr=0.1, momentum=0.9)
    o2 = SSAM(m2.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, model=m2, lr=0.1, momentum=0.9)
    for _ in range(3):
        with o1.ascent_pass():
            F.cross_entropy(m1(x), y).backward()
        o1.first_step(zero_grad=True)
        with o1.descent_pass():
            F.cross_entropy(m1(x), y).backward()
        o1.second_step(zero_grad=True)

        with o2.ascent_pass():
            F.cross_entropy(m2(x), y).backward()
        with o2.perturbed():
            F.cross_entropy(m2(x), y).backward()
    assert same(weights(m1), weights(m2))
    assert all(torch.equal(a, b) for a, b in zip(m1.buffers(), m2.buffers()))  # BN stats: clean pass only

    w = weights(m2)
    with o2.ascent_pass():
        F.cross_entropy(m2(x), y).backward()
    with pytest.raises(KeyboardInterrupt), o2.perturbed():
        F.cross_entropy(m2(x), y).backward()
        raise KeyboardInterrupt
    assert same(weights(m2), w)
    o2.state_dict()


# ------------------------------------------------------------------------------------- case 10
class _CountingSource(MaskSource):
    """Update every 2 steps; records the step of every update."""

    def __init__(self):
        super().__init__(0.5, update_every=2)
        self.updates = []

    def init(self, ctx):
        return {n: torch.ones_like(p, dtype=torch.bool) for n, p in ctx.params.items()}

    def update(self, ctx):
        self.updates.append(ctx.step)


def test_a_grad_scaler_skipped_step_does_not_advance_the_mask_clock():
    x, y = tiny_data(dtype=torch.float32)
    model = tiny_net(dtype=torch.float32)
    src = _CountingSource()
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=src)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)

    def train_step(inject):
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if inject:
            model[2].bias.grad[0] = float("nan")
        opt.second_step(zero_grad=True)
        scaler.update()

    train_step(False)
    assert opt._steps == 1
    train_step(True)  # skipped by the scaler: the weights do not move, and neither does the clock
    assert opt._steps == 1
    assert opt.state_dict()["sparsam"]["steps"] == 1
    train_step(False)
    train_step(False)
    assert opt._steps == 3
    assert src.updates == [2]  # the update came at the 2nd step that was taken, not the 2nd attempted


# ------------------------------------------------------------------------------------- case 11
def test_loading_a_differently_shaped_model_fails_at_load():
    _, src = trained_ssam()
    sd = roundtrip(src.state_dict())
    del sd["sparsam"]
    torch.manual_seed(0)
    other = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    sam = SAM(other.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    snap = snapshot(sam)
    with pytest.raises(ValueError, match=r"momentum_buffer.*\(8, 6\).*\(5, 6\)"):
        sam.load_state_dict(sd)
    assert_unchanged(sam, snap)


def test_sam_sgd_refuses_a_sam_adamw_state():
    model = tiny_net()
    x, y = tiny_data()
    adam = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01)
    adam.step(closure_for(model, x, y))
    sd = roundtrip(adam.state_dict())
    sgd = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    snap = snapshot(sgd)
    with pytest.raises(ValueError, match="AdamW.*SGD"):
        sgd.load_state_dict(sd)
    assert_unchanged(sgd, snap)
    del sd["sparsam"]  # a plain AdamW state dict: recognised by its settings
    with pytest.raises(ValueError, match="momentum"):
        sgd.load_state_dict(sd)
    assert_unchanged(sgd, snap)


def test_state_dicts_of_the_same_optimizer_still_load():
    # the checks do not refuse what is right: plain base state into SAM and into SSAM
    model = tiny_net()
    x, y = tiny_data()
    plain = torch.optim.AdamW(model.parameters(), lr=0.02)
    F.cross_entropy(model(x), y).backward()
    plain.step()
    sam = SAM(model.parameters(), torch.optim.AdamW, rho=0.1, lr=0.01)
    sam.load_state_dict(roundtrip(plain.state_dict()))
    assert sam.param_groups[0]["lr"] == 0.02 and sam.param_groups[0]["rho"] == 0.1


# ------------------------------------------------------------------------------------- case 17
def test_masks_set_by_hand_need_no_sparsity():
    model = tiny_net()
    x, y = tiny_data()
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model)
    assert isinstance(opt.mask_source, ManualMask)
    m = torch.zeros(8, 6, dtype=torch.bool)
    m[:, :3] = True
    opt.set_masks({"0.weight": m})
    # fraction of perturbable coordinates not perturbed
    total = sum(p.numel() for p in model.parameters())
    assert opt.sparsity == pytest.approx(1 - 24 / total)
    w = weights(model)
    opt.step(closure_for(model, x, y))
    assert not same(weights(model), w)
    # saved and loaded like any other source
    sd = roundtrip(opt.state_dict())
    assert sd["sparsam"]["mask_source_type"] == "ManualMask"
    model2 = tiny_net()
    opt2 = SSAM(model2.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model2)
    opt2.load_state_dict(sd)
    assert opt2.masks.keys() == {"0.weight"} and torch.equal(opt2.masks["0.weight"], m)
    assert opt2.sparsity == pytest.approx(opt.sparsity)


def test_manual_mask_given_up_front_and_missing_masks_named():
    model = tiny_net()
    x, y = tiny_data()
    m = torch.ones(3, 8, dtype=torch.bool)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=ManualMask({"2.weight": m}))
    opt.step(closure_for(model, x, y))
    assert opt.masks.keys() == {"2.weight"}
    bare = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model)
    w = weights(model)
    with pytest.raises(RuntimeError, match="set_masks"):
        bare.step(closure_for(model, x, y))
    assert same(weights(model), w)
