"""DynamicMask, RandomMask, NormLayersMask, AllOnesMask, mask_stats, update schedules."""

import math

import pytest
import torch
from torch import nn

from sparsam.masks import (
    AllOnesMask,
    DynamicMask,
    MaskContext,
    NormLayersMask,
    RandomMask,
    keep_count,
    mask_stats,
)
from sparsam.masks.dynamic import cosine_drop_rate


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 3, 3, 3), "b.bias": (4,)}
    return {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def _count(masks):
    return sum(int(m.sum()) for m in masks.values())


def test_cosine_schedule():
    assert cosine_drop_rate(0, 100) == 0.5
    assert math.isclose(cosine_drop_rate(50, 100), 0.25)
    assert math.isclose(cosine_drop_rate(25, 100, alpha=0.4), 0.4 * (1 + math.cos(math.pi / 4)) / 2)
    assert cosine_drop_rate(100, 100) == 0.0 and cosine_drop_rate(500, 100) == 0.0
    dm = DynamicMask(0.5, 80, alpha=0.3, update_every=1)
    assert math.isclose(dm.drop_rate(20), 0.3 * (1 + math.cos(math.pi * 20 / 80)) / 2)


def test_dynamic_init_is_exact_random_budget():
    params = _params()
    n = sum(p.numel() for p in params.values())
    for s in (0.0, 0.5, 0.9):
        masks = DynamicMask(s, 10, update_every=1).init(MaskContext(params=params))
        assert _count(masks) == keep_count(n, s)
        assert all(m.dtype == torch.bool and m.shape == params[k].shape for k, m in masks.items())
    layer = DynamicMask(0.7, 10, update_every=1, budget="layer").init(MaskContext(params=params))
    for k, m in layer.items():
        assert int(m.sum()) == keep_count(m.numel(), 0.7)


@pytest.mark.parametrize("grow", ["random", "gradient"])
def test_dynamic_update_drop_and_grow(grow):
    params = _params()
    dm = DynamicMask(0.6, total_steps=40, update_every=5, grow=grow, seed=3)
    masks = dm.init(MaskContext(params=params))
    for step in (5, 10, 20, 35):
        grads = _grads(params, step)
        new = dm.update(MaskContext(params=params, step=step, grads=grads, masks=masks))
        old_f, new_f, g_f = _flat(masks), _flat(new), _flat(grads).abs()
        live = int(old_f.sum())
        assert int(new_f.sum()) == live  # conservation
        n_move = round(cosine_drop_rate(step, 40) * live)
        dropped = old_f & ~new_f
        grown = new_f & ~old_f
        assert int(dropped.sum()) == n_move and int(grown.sum()) == n_move
        # Dropped: exactly the n_move live coordinates with the smallest |g|.
        live_idx = torch.nonzero(old_f).flatten().tolist()
        expect = sorted(live_idx, key=lambda i: (float(g_f[i]), i))[:n_move]
        assert sorted(torch.nonzero(dropped).flatten().tolist()) == sorted(expect)
        # Grown: among coordinates inactive before the update.
        assert not (grown & old_f).any()
        if grow == "gradient":
            dead_idx = torch.nonzero(~old_f).flatten().tolist()
            expect = sorted(dead_idx, key=lambda i: (-float(g_f[i]), i))[:n_move]
            assert sorted(torch.nonzero(grown).flatten().tolist()) == sorted(expect)
        masks = new
    # After T the drop rate is 0: nothing moves.
    same = dm.update(MaskContext(params=params, step=40, grads=_grads(params, 99), masks=masks))
    assert torch.equal(_flat(same), _flat(masks))


def test_dynamic_layer_budget_conserves_each_tensor():
    params = _params()
    dm = DynamicMask(0.5, 10, update_every=1, budget="layer")
    masks = dm.init(MaskContext(params=params))
    new = dm.update(MaskContext(params=params, step=1, grads=_grads(params, 1), masks=masks))
    for k in params:
        assert int(new[k].sum()) == int(masks[k].sum())
    assert any(not torch.equal(new[k], masks[k]) for k in params)


def test_dynamic_missing_grad_counts_as_zero_and_cap():
    params = {"w": torch.zeros(10, dtype=torch.float64), "v": torch.zeros(10, dtype=torch.float64)}
    masks = {"w": torch.ones(10, dtype=torch.bool), "v": torch.zeros(10, dtype=torch.bool)}
    masks["v"][:5] = True
    grads = {"v": torch.arange(1.0, 11.0, dtype=torch.float64)}  # "w" has no gradient
    dm = DynamicMask(0.25, 100, alpha=1.0, update_every=1, grow="gradient")
    # rate 1.0 -> n = round(15) but only 5 inactive coordinates: capped at 5.
    new = dm.update(MaskContext(params=params, step=0, grads=grads, masks=masks))
    assert _count(new) == 15
    assert not new["w"][:5].any() and new["w"][5:].all()  # |g| = 0, ties: lowest indices dropped
    assert new["v"].all()


def test_dynamic_resume_makes_identical_masks():
    params = _params()

    def run(dm, masks, steps):
        out = []
        for t in steps:
            masks = dm.update(MaskContext(params=params, step=t, grads=_grads(params, t), masks=masks))
            out.append(masks)
        return masks, out

    a = DynamicMask(0.5, 50, update_every=1, seed=7)
    masks = a.init(MaskContext(params=params))
    masks, _ = run(a, masks, [1, 2])
    state = a.state_dict()
    _, straight = run(a, masks, [3, 4, 5])
    with pytest.raises(ValueError, match="seed: saved 7, built 123"):  # the built source's settings are used
        DynamicMask(0.5, 50, update_every=1, seed=123).load_state_dict(state)
    b = DynamicMask(0.5, 50, update_every=1, seed=7)
    b.load_state_dict(state)
    _, resumed = run(b, masks, [3, 4, 5])
    for x, y in zip(straight, resumed):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_dynamic_bad_inputs():
    with pytest.raises(ValueError, match="update period"):
        DynamicMask(0.5, 100)
    with pytest.raises(ValueError, match="total_steps must be a positive int, got 0"):
        DynamicMask(0.5, 0, update_every=1)
    with pytest.raises(ValueError, match="alpha must be in"):
        DynamicMask(0.5, 10, alpha=1.5, update_every=1)
    with pytest.raises(ValueError, match="'biggest'"):
        DynamicMask(0.5, 10, grow="biggest", update_every=1)
    with pytest.raises(ValueError, match="sparsity"):
        DynamicMask(1.0, 10, update_every=1)
    assert DynamicMask.needs_grads and not DynamicMask.needs_data


def test_random_mask_budget_patterns_and_resume():
    params = _params()
    n = sum(p.numel() for p in params.values())
    rm = RandomMask(0.7, seed=1, update_every=2)
    m1 = rm.init(MaskContext(params=params))
    assert _count(m1) == keep_count(n, 0.7)
    state = rm.state_dict()
    m2 = rm.update(MaskContext(params=params, step=2))
    with pytest.raises(ValueError, match="update_every: saved 2, built None; seed: saved 1, built 9"):
        RandomMask(0.7, seed=9).load_state_dict(state)
    rm2 = RandomMask(0.7, seed=1, update_every=2)
    rm2.load_state_dict(state)
    m2b = rm2.update(MaskContext(params=params, step=2))
    assert all(torch.equal(m2[k], m2b[k]) for k in m2)
    assert not all(torch.equal(m1[k], m2[k]) for k in m1)
    nm = RandomMask(None, pattern="2:4").init(MaskContext(params=params))
    w = nm["b.weight"].reshape(4, -1)
    assert (w[:, :24].reshape(4, 6, 4).sum(-1) == 2).all() and (w[:, 24:].sum(-1) == 2).all()
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="sparsity"):
            RandomMask(bad)
    zeros = RandomMask(1.0).init(MaskContext(params=params))  # all false: SSAM = base optimizer
    assert not any(m.any() for m in zeros.values())
    assert [t for t in range(7) if rm.wants_update(t)] == [2, 4, 6]


def test_norm_layers_mask():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 2),
    )
    params = dict(model.named_parameters())
    masks = NormLayersMask().init(MaskContext(params=params, model=model))
    expect = {n: n.split(".")[0] in {"1", "2", "3", "6"} for n in params}
    assert {n: bool(m.all()) for n, m in masks.items()} == expect
    assert all(m.all() or not m.any() for m in masks.values())
    assert all(m.dtype == torch.bool for m in masks.values())
    custom = NormLayersMask(extra_types=(nn.Linear,)).init(MaskContext(params=params, model=model))
    assert custom["5.weight"].all() and not custom["0.weight"].any()
    with pytest.raises(ValueError, match="needs the model"):
        NormLayersMask().init(MaskContext(params=params))
    with pytest.raises(TypeError, match="extra_types"):
        NormLayersMask(extra_types=(int,))


def test_all_ones():
    params = _params()
    masks = AllOnesMask().init(MaskContext(params=params))
    assert all(m.all() and m.dtype == torch.bool for m in masks.values())


def test_mask_stats():
    a = {"x": torch.tensor([True, True, False, False]), "y": torch.tensor([[True, False], [False, False]])}
    b = {"x": torch.tensor([True, False, True, False]), "y": torch.tensor([[True, True], [False, False]])}
    st = mask_stats(b)
    assert st == {"numel": 8, "perturbed": 4, "density": 0.5, "density_per_param": {"x": 0.5, "y": 0.5}}
    st = mask_stats(b, a)
    # A = previous (3 set), B (4 set), A & B = 2, A | B = 5.
    assert st["overlap"] == 2 / 3 and st["jaccard"] == 2 / 5 and st["changed"] == 3
    assert all(type(v) in (int, float) for k, v in st.items() if k != "density_per_param")
    empty = {"x": torch.zeros(3, dtype=torch.bool)}
    st = mask_stats(empty, empty)
    assert math.isnan(st["overlap"]) and st["jaccard"] == 1.0 and st["density"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        mask_stats(a, {"x": torch.ones(3, dtype=torch.bool)})
