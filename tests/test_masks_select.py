"""sparsam.masks.select: budgets, tie-breaking, structured units, N:M layout, 1-D policy, errors."""

import math

import pytest
import torch

from sparsam.masks import keep_count, nm_mask, select


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _scores(seed=0, dtype=torch.float64):
    g = _gen(seed)
    shapes = {"conv.weight": (6, 4, 3, 3), "conv.bias": (6,), "fc.weight": (5, 24), "fc.bias": (5,), "scale": ()}
    return {n: torch.rand(s, generator=g, dtype=dtype) for n, s in shapes.items()}


def _stable_top(flat, k):
    """Reference: the k largest, ties to the lower index, via a plain Python sort."""
    order = sorted(range(len(flat)), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    return keep


def _flat(masks_or_scores):
    return torch.cat([t.reshape(-1) for t in masks_or_scores.values()])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.999])
def test_unstructured_global_is_exact_top_k(sparsity):
    scores = _scores()
    masks = select(scores, sparsity)
    assert list(masks) == list(scores)
    for n in scores:
        assert masks[n].dtype == torch.bool and masks[n].shape == scores[n].shape
    flat = _flat(scores)
    k = round((1 - sparsity) * flat.numel())
    assert torch.equal(_flat(masks), _stable_top(flat, k))


def test_ties_go_to_the_lower_flat_index():
    g = _gen(1)
    scores = {"a": torch.randint(0, 3, (7, 5), generator=g), "b": torch.randint(0, 3, (11,), generator=g)}
    flat = _flat(scores)
    for s in (0.2, 0.5, 0.7):
        masks = select(scores, s)
        assert torch.equal(_flat(masks), _stable_top(flat, keep_count(flat.numel(), s)))
    # All equal: the first k coordinates in dict order, row-major.
    const = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    m = select(const, 0.5)
    assert _flat(m).tolist() == [True] * 5 + [False] * 5


def test_keep_count_rounding():
    assert keep_count(5, 0.5) == 2  # Python round: half to even
    assert keep_count(7, 0.5) == 4
    assert keep_count(10, 0.9) == 1
    assert keep_count(0, 0.3) == 0


def test_unstructured_layer_budget():
    scores = _scores(2)
    masks = select(scores, 0.6, budget="layer")
    for n, s in scores.items():
        flat = s.reshape(-1)
        assert torch.equal(masks[n].reshape(-1), _stable_top(flat, round(0.4 * flat.numel())))


def test_one_d_policy_unstructured():
    scores = _scores(3)
    s = 0.75
    always = select(scores, s, one_d="always")
    never = select(scores, s, one_d="never")
    ranked = {n: t for n, t in scores.items() if t.dim() >= 2}
    ref = select(ranked, s)
    for n, t in scores.items():
        if t.dim() <= 1:
            assert always[n].all() and not never[n].any()
        else:
            assert torch.equal(always[n], ref[n]) and torch.equal(never[n], ref[n])


def test_structured_tensor_greedy_first_fit():
    # Means: a = 5 (10 coords), b = 9 (4), c = 1 (6), d = 4 (3). N = 23, k = round(0.5 * 23) = 12.
    scores = {
        "a": torch.full((2, 5), 5.0),
        "b": torch.full((4,), 9.0),
        "c": torch.full((3, 2), 1.0),
        "d": torch.full((3,), 4.0),
    }
    masks = select(scores, 0.5, "structured")
    # b (4) fits, a (10) does not fit in 8, d (3) fits, c (6) does not fit in 5: 7 kept <= 12.
    assert {n: bool(m.all()) for n, m in masks.items()} == {"a": False, "b": True, "c": False, "d": True}
    assert all(m.all() or not m.any() for m in masks.values())
    # Shortfall (12 - 7 = 5) is smaller than every skipped unit (10, 6).
    assert 12 - sum(int(m.sum()) for m in masks.values()) < min(10, 6)


def test_structured_tensor_ranks_by_mean_and_never_exceeds_budget():
    g = _gen(4)
    scores = {f"p{i}": torch.rand((i + 1, 3), generator=g) + i % 3 for i in range(8)}
    total = sum(t.numel() for t in scores.values())
    for s in (0.1, 0.4, 0.8):
        masks = select(scores, s, "structured", granularity="tensor")
        kept = sum(int(m.sum()) for m in masks.values())
        assert kept <= keep_count(total, s)
        # Reference first-fit over means.
        order = sorted(scores, key=lambda n: (-float(scores[n].mean()), list(scores).index(n)))
        left, expect = keep_count(total, s), {}
        for n in order:
            expect[n] = scores[n].numel() <= left
            left -= scores[n].numel() if expect[n] else 0
        assert {n: bool(m.all()) for n, m in masks.items()} == expect


def test_structured_channel_rows():
    g = _gen(5)
    scores = {"conv": torch.rand(8, 3, 2, 2, generator=g), "fc": torch.rand(6, 10, generator=g)}
    masks = select(scores, 0.5, "structured", granularity="channel", budget="layer")
    for n, t in scores.items():
        rows = masks[n].reshape(t.shape[0], -1)
        assert torch.equal(rows.all(1), rows.any(1))  # whole rows
        means = t.reshape(t.shape[0], -1).mean(1)
        assert torch.equal(rows.all(1), _stable_top(means, round(0.5 * t.shape[0])))
    glob = select(scores, 0.5, "structured", granularity="channel")
    total = sum(t.numel() for t in scores.values())
    kept = sum(int(m.sum()) for m in glob.values())
    assert kept <= keep_count(total, 0.5)
    for n, t in scores.items():
        rows = glob[n].reshape(t.shape[0], -1)
        assert torch.equal(rows.all(1), rows.any(1))


def _nm_reference(score, n, m):
    """Plain loops: rows of the (out, in) view, groups of m consecutive columns, top-n each."""
    mat = score.reshape(score.shape[0], -1) if score.dim() >= 2 else score.reshape(1, -1)
    keep = torch.zeros(mat.shape, dtype=torch.bool)
    for r in range(mat.shape[0]):
        for start in range(0, mat.shape[1], m):
            cols = list(range(start, min(start + m, mat.shape[1])))
            best = sorted(cols, key=lambda c: (-float(mat[r, c]), c))[:n]
            keep[r, best] = True
    return keep.reshape(score.shape)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (4, 8), (3, 4), (1, 1)])
@pytest.mark.parametrize(
    "shape", [(8, 16), (6, 4, 3, 3), (5, 3, 3, 3), (4, 10), (3, 2, 5)], ids=["linear", "conv", "conv-pad", "pad", "3d"]
)
def test_nm_keeps_each_groups_top_n(n, m, shape):
    g = _gen(6)
    score = torch.rand(shape, generator=g, dtype=torch.float64)
    mask = select({"w": score}, None, f"{n}:{m}")["w"]
    assert mask.dtype == torch.bool and mask.shape == score.shape
    assert torch.equal(mask, _nm_reference(score, n, m))
    assert torch.equal(mask, nm_mask(score, n, m))
    # Every full group of the (out, in) view keeps exactly n.
    mat = mask.reshape(shape[0], -1)
    full = (mat.shape[1] // m) * m
    if full:
        assert (mat[:, :full].reshape(shape[0], -1, m).sum(-1) == n).all()
    # Partial last group (padded): keeps min(n, g) of its g real entries.
    rest = mat.shape[1] - full
    if rest:
        assert (mat[:, full:].sum(-1) == min(n, rest)).all()


def test_nm_conv_layout_is_input_dimension():
    # A conv weight (C_out, C_in, k, k): groups run over C_in*k*k of each output channel, so the
    # kept entries of output channel 0 are the top-2 of weight[0].reshape(-1)'s first 4, etc.
    score = torch.arange(2 * 2 * 2 * 2, dtype=torch.float64).reshape(2, 2, 2, 2).flip(-1)
    mask = select({"w": score}, 0.5, "2:4")["w"]
    flat = score.reshape(2, 8)
    for r in range(2):
        for gi in range(2):
            grp = flat[r, 4 * gi : 4 * gi + 4]
            top = set(torch.topk(grp, 2).indices.tolist())
            got = set(torch.nonzero(mask.reshape(2, 8)[r, 4 * gi : 4 * gi + 4]).flatten().tolist())
            assert got == top


def test_nm_ties_and_pattern_spellings():
    score = {"w": torch.zeros(2, 8)}
    mask = select(score, None, "nm", n=2, m=4)["w"]
    assert mask.tolist() == [[True, True, False, False] * 2] * 2
    s = _scores(7)
    a = select(s, None, "2:4")
    b = select(s, 0.5, "nm", n=2, m=4)
    c = select(s, None, "N:M", n=2, m=4)
    for k in s:
        assert torch.equal(a[k], b[k]) and torch.equal(a[k], c[k])


def test_nm_one_d_policy():
    s = _scores(8)
    default = select(s, None, "2:4")
    never = select(s, None, "2:4", one_d="never")
    ranked = select(s, None, "2:4", one_d="rank")
    for n, t in s.items():
        if t.dim() <= 1:
            assert default[n].all()
            assert not never[n].any()
            assert torch.equal(ranked[n], _nm_reference(t.reshape(-1), 2, 4).reshape(t.shape))
        else:
            assert torch.equal(default[n], never[n])


def test_empty_and_zero_size():
    assert select({}, 0.5) == {}
    out = select({"e": torch.zeros(0, 3), "x": torch.ones(4)}, 0.5)
    assert out["e"].shape == (0, 3) and int(out["x"].sum()) == 2
    assert select({"e": torch.zeros(0, 4)}, None, "2:4", one_d="rank")["e"].shape == (0, 4)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_sparsity(sparsity):
    with pytest.raises(ValueError, match="sparsity"):
        select(_scores(), sparsity)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(pattern="nm", n=5, m=4), "n <= m"),
        (dict(pattern="nm", n=0, m=4), "n >= 1"),
        (dict(pattern="nm", n=1, m=0), "m >= 1"),
        (dict(pattern="3:2"), "n <= m"),
        (dict(pattern="diagonal"), "unknown pattern 'diagonal'"),
        (dict(pattern="2:4", n=1), "disagrees"),
        (dict(pattern="unstructured", n=2, m=4), "only apply"),
        (dict(granularity="block"), "'block'"),
        (dict(budget="local"), "'local'"),
        (dict(one_d="sometimes"), "'sometimes'"),
        (dict(pattern="structured", budget="layer"), "granularity='tensor'"),
    ],
)
def test_bad_options(kwargs, match):
    nm = ":" in kwargs.get("pattern", "") or kwargs.get("pattern") == "nm" or kwargs.get("pattern") == "diagonal"
    with pytest.raises(ValueError, match=match):
        select(_scores(), None if nm else 0.5, **kwargs)


def test_bad_types_and_values():
    with pytest.raises(TypeError, match="n as an int"):
        select(_scores(), None, "nm", n=2.0, m=4)
    with pytest.raises(ValueError, match="disagrees with the 2:4"):
        select(_scores(), 0.3, "2:4")
    with pytest.raises(ValueError, match="needs a sparsity"):
        select(_scores(), None)
    with pytest.raises(ValueError, match="NaN"):
        select({"a": torch.tensor([1.0, math.nan])}, 0.5)
    with pytest.raises(TypeError, match="dict"):
        select([torch.ones(3)], 0.5)
    with pytest.raises(TypeError, match="sparsity"):
        select(_scores(), "0.5")
