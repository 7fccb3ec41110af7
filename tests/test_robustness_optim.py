"""Robustness at the optimizer level: loading is checked and all-or-nothing, an interrupted step never
leaves the weights at w + e, a skipped GradScaler step does not move SSAM's mask schedule, and
masks set by hand are a mask source of their own."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsam import SAM, SSAM
from sparsam.masks import DynamicMask, ManualMask, MaskSource, RandomMask
from sparsam.optim.sam import STATE_VERSION

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


# ------------------------------------------------------ a state of another optimizer or mask source
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


# -------------------------------------------------------------------- a failed load changes nothing
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


# ------------------------------------------------------------------- an interrupted step restores w
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


# ----------------------------------------------------- a skipped GradScaler step and the mask clock
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


# ------------------------------------------------------- a state of another model or base optimizer
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


# -------------------------------------------------------------------------------- masks set by hand
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


# ------------------------------------------------------------------ FSDP1, ManualMask, SSAM's refusals
@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A process group of one (gloo, CPU): enough to wrap a module in FSDP1."""
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - another test left one behind
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
@pytest.mark.parametrize("orig", [False, True])
@pytest.mark.parametrize("cls", [SAM, SSAM])
def test_fsdp1_is_refused_by_the_optimizer(gloo_world_of_one, cls, orig):
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = FullyShardedDataParallel(tiny_net(bn=False).float(), device_id=torch.device("cpu"), use_orig_params=orig)
    extra = {"sparsity": 0.5} if cls is SSAM else {}
    with pytest.raises(ValueError, match=r"managed by FSDP1.*fully_shard") as e:
        cls(wrapped.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, **extra)
    assert "norm over all shards" in str(e.value)
    with pytest.raises(ValueError, match=r"model= is wrapped in FSDP1.*fully_shard"):
        cls(tiny_net().parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=wrapped, **extra)


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")
def test_fsdp1_applied_after_the_optimizer_is_refused_at_the_first_step(gloo_world_of_one):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = tiny_net(bn=False).float()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
    x, y = tiny_data(dtype=torch.float32)
    F.cross_entropy(wrapped(x), y).backward()
    w = weights(model)
    with pytest.raises(ValueError, match="managed by FSDP1"):
        opt.first_step()
    assert same(weights(model), w) and not opt._in_perturbation  # nothing moved
    # FSDP2 (fully_shard) is not mistaken for FSDP1
    from torch.distributed.fsdp import fully_shard

    sharded = tiny_net(bn=False).float()
    fully_shard(sharded)
    SAM(sharded.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=sharded)


def test_manual_mask_checks_its_masks_when_built():
    with pytest.raises(TypeError, match=r"'0.weight' must have dtype torch.bool, got torch.float32"):
        ManualMask({"0.weight": torch.ones(8, 6)})
    with pytest.raises(TypeError, match=r"'0.weight' must be a tensor, got list"):
        ManualMask({"0.weight": [True]})
    with pytest.raises(TypeError, match=r"keyed by parameter name.*got the key 0"):
        ManualMask({0: torch.ones(8, 6, dtype=torch.bool)})
    model = tiny_net()
    ok = torch.ones(8, 6, dtype=torch.bool)
    # the optimizer that takes the source knows the parameters: names and shapes are checked there,
    # before any step
    with pytest.raises(KeyError, match=r"no parameter named '0.weigth'"):
        SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=ManualMask({"0.weigth": ok}))
    with pytest.raises(
        ValueError, match=r"mask for parameter '2.weight': mask shape \(8, 6\) does not match .*\(3, 8\)"
    ):
        SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=ManualMask({"2.weight": ok}))
    SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=ManualMask({"0.weight": ok}))


def test_ssam_refuses_a_scheduled_ssam_state_for_the_true_reason():
    from sparsam.optim.schedule import ScheduledSAM, ScheduledSSAM

    model = tiny_net()
    x, y = tiny_data()
    sched = ScheduledSSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, sparsity=0.5, model=model, every=2)
    sched.step(closure_for(model, x, y))
    sd = roundtrip(sched.state_dict())
    _, target = trained_ssam(steps=0)
    snap = snapshot(target)
    with pytest.raises(ValueError) as e:
        target.load_state_dict(sd)
    msg = str(e.value)
    assert "holds no masks" not in msg  # it does hold masks
    assert "ScheduledSSAM" in msg and "schedule_step" in msg and "would drop" in msg
    assert_unchanged(target, snap)
    # a state that really holds no masks still says so
    sam = ScheduledSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, every=2)
    with pytest.raises(ValueError, match="'ScheduledSAM' state into SSAM: it holds no masks"):
        target.load_state_dict(roundtrip(sam.state_dict()))


# ------------------------------------------------------------------ the state's version and keys
def _variants(model):
    from sparsam.optim.esam import ESAM
    from sparsam.optim.looksam import LookSAM, LookSSAM
    from sparsam.optim.schedule import ScheduledSAM, ScheduledSSAM

    kw = dict(rho=0.1, lr=0.1, model=model)
    return {
        "SAM": SAM(model.parameters(), torch.optim.SGD, **kw),
        "SSAM": SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, **kw),
        "ScheduledSAM": ScheduledSAM(model.parameters(), torch.optim.SGD, every=2, **kw),
        "ScheduledSSAM": ScheduledSSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, every=2, **kw),
        "LookSAM": LookSAM(model.parameters(), torch.optim.SGD, k=2, **kw),
        "LookSSAM": LookSSAM(model.parameters(), torch.optim.SGD, k=2, sparsity=0.5, **kw),
        "ESAM": ESAM(model.parameters(), torch.optim.SGD, gamma=1.0, **kw),
    }


def test_every_optimizer_declares_the_keys_it_writes():
    # the declared keys are what each class writes, and so what a state of its type must hold
    model = tiny_net()
    x, y = tiny_data()
    for name, opt in _variants(model).items():
        opt.step(closure_for(model, x, y))
        extra = opt.state_dict()["sparsam"]
        assert extra["type"] == name and extra["version"] == STATE_VERSION
        assert set(extra) == type(opt)._state_keys(), name


@pytest.mark.parametrize("version", [99, 0, "1", None, True])
@pytest.mark.parametrize("kind", ["sam", "ssam"])
def test_an_unknown_state_version_is_refused_by_number(kind, version):
    if kind == "ssam":
        _, src = trained_ssam()
        _, target = trained_ssam(steps=1)
    else:
        model = tiny_net()
        x, y = tiny_data()
        src = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
        src.step(closure_for(model, x, y))
        target = SAM(tiny_net().parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    sd = roundtrip(src.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # a visible difference if the load got halfway
    if version is None:
        del sd["sparsam"]["version"]
    else:
        sd["sparsam"]["version"] = version
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"version") as e:
        target.load_state_dict(sd)
    assert repr(version) in str(e.value) or str(version) in str(e.value)
    if version == 99:
        assert "newer sparsam" in str(e.value)
    assert target.param_groups[0]["lr"] == 0.1
    assert_unchanged(target, snap)


@pytest.mark.parametrize("key", ["steps", "masks_ready", "norm", "compute", "type"])
def test_a_state_missing_a_key_is_refused_naming_it(key):
    _, src = trained_ssam(steps=3)
    sd = roundtrip(src.state_dict())
    del sd["sparsam"][key]
    _, target = trained_ssam(steps=1)
    snap = snapshot(target)
    with pytest.raises(ValueError, match=repr(key) if key != "type" else "type=None") as e:
        target.load_state_dict(sd)
    assert f"version {STATE_VERSION}" in str(e.value)
    assert_unchanged(target, snap)


def test_a_renamed_key_is_refused_naming_both():
    _, src = trained_ssam(steps=3)
    sd = roundtrip(src.state_dict())
    sd["sparsam"]["step"] = sd["sparsam"].pop("steps")
    _, target = trained_ssam(steps=1)
    snap = snapshot(target)
    with pytest.raises(
        ValueError, match=rf"SSAM state \(state version {STATE_VERSION}\) has no 'steps' entry.*holds 'step' instead"
    ):
        target.load_state_dict(sd)
    assert_unchanged(target, snap)
    sd["sparsam"]["steps"] = sd["sparsam"]["step"]  # an extra key the class does not write: refused too
    with pytest.raises(ValueError, match=r"holds 'step', which SSAM does not write"):
        target.load_state_dict(sd)
    assert_unchanged(target, snap)


def test_states_of_every_variant_round_trip_through_the_checks():
    model = tiny_net()
    x, y = tiny_data()
    for name, opt in _variants(model).items():
        opt.step(closure_for(model, x, y))
        before = roundtrip(opt.state_dict())
        opt.load_state_dict(before)  # its own state loads, unchanged
        after = opt.state_dict()["sparsam"]
        assert after.keys() == before["sparsam"].keys() and after["compute"] == before["sparsam"]["compute"], name


# ------------------------------------------------------------------ settings outside the param groups
def _pair(kind, saved_kw, built_kw):
    from sparsam.optim.esam import ESAM
    from sparsam.optim.looksam import LookSAM
    from sparsam.optim.schedule import ScheduledSAM

    def make(kw):
        model = tiny_net()
        common = dict(rho=0.1, lr=0.1, model=model)
        if kind == "sam":
            return SAM(model.parameters(), torch.optim.SGD, **common, **kw)
        if kind == "looksam":
            return LookSAM(model.parameters(), torch.optim.SGD, **common, **kw)
        if kind == "scheduled":
            return ScheduledSAM(model.parameters(), torch.optim.SGD, **common, total_steps=10, **kw)
        if kind == "esam":
            return ESAM(model.parameters(), torch.optim.SGD, **common, **kw)
        if kind == "dynamic":
            mask = DynamicMask(0.5, kw.pop("total_steps"), update_every=2)
            return SSAM(model.parameters(), torch.optim.SGD, **common, mask=mask, **kw)
        return SSAM(model.parameters(), torch.optim.SGD, **common, mask=RandomMask(**kw))

    return make(dict(saved_kw)), make(dict(built_kw))


@pytest.mark.parametrize(
    "kind, saved_kw, built_kw, words",
    [
        ("sam", {"eps": 1e-12}, {"eps": 1e-7}, "eps: saved 1e-12, built 1e-07"),
        ("sam", {"ascent": "local"}, {"ascent": "sync"}, "ascent: saved 'local', built 'sync'"),
        ("looksam", {"k": 5}, {"k": 3}, "k: saved 5, built 3"),
        ("looksam", {"alpha": 0.7}, {"alpha": 0.1}, "alpha: saved 0.7, built 0.1"),
        ("scheduled", {"start": 0.5}, {"start": 0.2}, "start: saved 0.5, built 0.2"),
        ("scheduled", {"ascent_fraction": 0.5}, {"ascent_fraction": 0.25}, "ascent_fraction: saved 0.5, built 0.25"),
        ("esam", {"gamma": 0.5}, {"gamma": 1.0}, "gamma: saved 0.5, built 1.0"),
        ("esam", {"beta": 0.6}, {"beta": 0.5}, "beta: saved 0.6, built 0.5"),
        ("random", {"sparsity": 0.5, "seed": 3}, {"sparsity": 0.3, "seed": 3}, "sparsity: saved 0.5, built 0.3"),
        ("random", {"sparsity": 0.5, "seed": 3}, {"sparsity": 0.5, "seed": 4}, "seed: saved 3, built 4"),
        ("dynamic", {"total_steps": 100}, {"total_steps": 50}, "total_steps: saved 100, built 50"),
    ],
)
def test_settings_outside_the_groups_the_built_object_wins_and_a_differing_saved_one_is_refused(
    kind, saved_kw, built_kw, words
):
    saved, built = _pair(kind, saved_kw, built_kw)
    sd = roundtrip(saved.state_dict())
    sd["param_groups"][0]["lr"] = 0.5  # a visible difference if the load got halfway
    snap = snapshot(built)
    with pytest.raises(ValueError, match="other settings than this") as e:
        built.load_state_dict(sd)
    assert words in str(e.value), str(e.value)
    assert built.param_groups[0]["lr"] == 0.1
    assert_unchanged(built, snap)
    same, other = _pair(kind, saved_kw, saved_kw)
    other.load_state_dict(roundtrip(same.state_dict()))  # the same settings load


def test_a_version_1_state_is_migrated_with_a_warning():
    _, src = trained_ssam(steps=3)
    sd = roundtrip(src.state_dict())
    del sd["sparsam"]["settings"]  # what version 1 wrote
    sd["sparsam"]["version"] = 1
    _, target = trained_ssam(steps=1)
    with pytest.warns(UserWarning, match=r"older sparsam \(state version 1\).*settings=None"):
        target.load_state_dict(sd)
    assert target._steps == 3 and target.state_dict()["sparsam"]["version"] == STATE_VERSION
    # the mask source's settings were saved in version 1 too: still compared
    sd["sparsam"]["mask_source"]["sparsity"] = 0.25
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="sparsity: saved 0.25, built 0.5"):
        target.load_state_dict(sd)


# ------------------------------------------------------------------ a skipped step and the mask schedule
def _schedule_run(mask, form, skip_at, steps=6, deferred=False):
    """SSAM under a GradScaler; the attempt numbered ``skip_at`` gets a non-finite descent gradient
    (the scaler skips it) and the same batch is tried again. Returns the model, the optimizer and
    the masks after every step that counted."""
    model = tiny_net(dtype=torch.float32)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, mask=mask, form=form)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    history, attempt, t = [], 0, 0
    while t < steps:
        x, y = tiny_data(seed=10 + t, dtype=torch.float32)
        with opt.ascent_pass():
            scaler.scale(F.cross_entropy(model(x), y)).backward()
        opt.first_step(zero_grad=True, grad_scaler=scaler)
        with opt.descent_pass():
            scaler.scale(F.cross_entropy(model(x), y)).backward()
        if attempt == skip_at:
            model[2].bias.grad[0] = float("nan")
        if deferred:  # the caller takes the base step (as the transformers Trainer does)
            opt.second_step(base_step=False)
            scaler.step(opt.base_optimizer)
            opt.zero_grad()
        else:
            opt.second_step(zero_grad=True)
        scaler.update()
        if attempt != skip_at:
            history.append({k: v.clone() for k, v in opt.masks.items()})
            t += 1
        attempt += 1
    return model, opt, history


@pytest.mark.parametrize(
    "make, form",
    [
        (lambda: DynamicMask(0.5, 10, update_every=2, seed=1), "explicit"),  # drop by |g|, grow at random
        (lambda: DynamicMask(0.5, 10, update_every=2, seed=1, timing="after-step"), "explicit"),
        (lambda: RandomMask(0.5, seed=1, update_every=2), "implicit"),  # updated before pass 1
    ],
)
@pytest.mark.parametrize("deferred", [False, True])
def test_a_skipped_step_does_not_add_a_mask_update_round(make, form, deferred):
    # A step the scaler skips at a mask-update step (t = 2) must leave the schedule as if it had not
    # been tried: one update at t = 2 from the retried step's gradient, masks and weights equal to a
    # run without the skipped attempt (the scale is a power of two either way: unscaling is exact).
    ref_model, ref, ref_history = _schedule_run(make(), form, skip_at=-1, deferred=deferred)
    model, opt, history = _schedule_run(make(), form, skip_at=2, deferred=deferred)
    assert opt._steps == ref._steps == 6
    for t, (a, b) in enumerate(zip(history, ref_history, strict=True)):
        assert a.keys() == b.keys(), t
        assert all(torch.equal(a[k], b[k]) for k in a), t
    assert same(weights(model), weights(ref_model))
    assert opt.mask_source.generator.get_state().equal(ref.mask_source.generator.get_state())


# ------------------------------------------------------------------ frozen when the masks are chosen
@pytest.mark.parametrize("update_every", [None, 2])
def test_a_parameter_unfrozen_after_the_masks_were_chosen_is_not_left_out_silently(update_every):
    model = tiny_net()
    x, y = tiny_data()
    model[0].weight.requires_grad_(False)
    opt = SSAM(
        model.parameters(),
        torch.optim.SGD,
        rho=0.1,
        lr=0.1,
        model=model,
        mask=RandomMask(0.5, update_every=update_every),
    )
    opt.step(closure_for(model, x, y))  # masks chosen while 0.weight is frozen
    assert "0.weight" not in opt.masks
    model[0].weight.requires_grad_(True)
    expected = "never updates its masks" if update_every is None else "includes it from its next mask update on"
    with pytest.warns(
        UserWarning, match=rf"'0.weight' were frozen .* when the masks were chosen.*{expected}.*init_masks"
    ):
        opt.step(closure_for(model, x, y))  # step 1: no update yet, 0.weight still unperturbed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: no second warning
        opt.step(closure_for(model, x, y))
    if update_every is None:  # the way out the warning names
        assert "0.weight" not in opt.masks
        opt.init_masks()
    assert "0.weight" in opt.masks  # the update at step 2 (or init_masks) chose its mask too


def test_masks_set_by_hand_leave_out_frozen_parameters_without_a_warning():
    model = tiny_net()
    x, y = tiny_data()
    model[0].weight.requires_grad_(False)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model)
    opt.set_masks({"2.weight": torch.ones(3, 8, dtype=torch.bool)})
    opt.step(closure_for(model, x, y))
    model[0].weight.requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure_for(model, x, y))


@pytest.mark.parametrize(
    "saved, built, words",
    [
        (RandomMask(0.5, seed=3), RandomMask(0.5, seed=3, budget="layer"), "budget: saved 'global', built 'layer'"),
        (RandomMask(0.5, seed=3), RandomMask(0.5, seed=3, pattern="structured"), "pattern: saved 'unstructured'"),
        (
            DynamicMask(0.5, 10, update_every=2),
            DynamicMask(0.5, 10, update_every=2, grow="gradient"),
            "grow: saved 'random', built 'gradient'",
        ),
    ],
)
def test_mask_source_pattern_settings_follow_the_rule(saved, built, words):
    from sparsam.masks import FisherMask

    with pytest.raises(ValueError, match="other settings than this") as e:
        built.load_state_dict(roundtrip(saved.state_dict()))
    assert words in str(e.value)
    a, b = FisherMask(0.5, num_samples=16), FisherMask(0.5, num_samples=32)
    with pytest.raises(ValueError, match="num_samples: saved 16, built 32"):
        b.load_state_dict(roundtrip(a.state_dict()))
