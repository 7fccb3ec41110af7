"""sparsam.analysis: Hessian tools, landscapes and sharpness against dense references (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from sparsam import analysis as A

# ---------------------------------------------------------------------------------------------
# Tiny models and dense references
# ---------------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> nn.Module:
    """4 -> 6 -> 3 with tanh: 51 parameters, an indefinite Hessian at initialisation."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def bn_net(seed: int = 0) -> nn.Module:
    """A tiny conv net with BatchNorm (90 parameters, 3 buffers)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)
    ).double()
    # non-trivial running statistics and affine parameters, so that eval mode differs from train mode
    with torch.no_grad():
        bn = net[1]
        bn.running_mean.copy_(torch.tensor([0.3, -0.2]))
        bn.running_var.copy_(torch.tensor([1.5, 0.7]))
        bn.num_batches_tracked.fill_(7)
        bn.weight.copy_(torch.tensor([1.2, 0.8]))
        bn.bias.copy_(torch.tensor([0.1, -0.3]))
    return net


class Quadratic(nn.Module):
    """Outputs ``0.5 w^T A w + b^T w`` for every sample: with ``loss_fn = mean`` the Hessian is ``A``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.w @ self.a @ self.w + self.b @ self.w).expand(x.shape[0])


def mean_output(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs.mean()


def quadratic_with_spectrum(eigs: list[float], seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T
    a = 0.5 * (a + a.T)
    return Quadratic(
        a, torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    )


QUAD_DATA = [(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))]


def classification_batches(sizes: list[int], in_shape: tuple[int, ...] = (4,), classes: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn((n, *in_shape), generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g))
        for n in sizes
    ]


def dense_hessian(model: nn.Module, loss_fn, batches, params: list[torch.Tensor] | None = None) -> torch.Tensor:
    """torch.autograd.functional.hessian of the size-weighted mean loss on the flattened parameters
    (buffers passed as copies, so the model is not touched)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is not None:
        ids = {id(p) for p in params}
        named = [(n, p) for n, p in named if id(p) in ids]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    numels = [p.numel() for _, p in named]
    total = sum(len(y) for _, y in batches)

    def f(flat: torch.Tensor) -> torch.Tensor:
        ps = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        out = 0.0
        for x, y in batches:
            bufs = {n: b.clone() for n, b in model.named_buffers()}
            out = out + len(y) / total * loss_fn(functional_call(model, {**ps, **bufs}, (x,)), y)
        return out

    w = torch.cat([p.detach().reshape(-1) for _, p in named])
    return torch.autograd.functional.hessian(f, w)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), f"{k} changed"


# ---------------------------------------------------------------------------------------------
# Hessian-vector products
# ---------------------------------------------------------------------------------------------


def test_hvp_equals_dense_hessian_times_v():
    model, data = mlp(), classification_batches([16])
    H = dense_hessian(model, F.cross_entropy, data)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hv = A.hessian_vector_product(model, F.cross_entropy, data, v)
    torch.testing.assert_close(hv, H @ v, rtol=1e-12, atol=1e-13)
    # the same vector given as one tensor per parameter
    vs = [t.view(p.shape) for t, p in zip(torch.split(v, [p.numel() for p in model.parameters()]), model.parameters())]
    hvs = A.hessian_vector_product(model, F.cross_entropy, data, vs)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in hvs]), H @ v, rtol=1e-12, atol=1e-13)


def test_hvp_on_parameter_subset_is_the_hessian_block():
    model, data = mlp(), classification_batches([16])
    first = list(model[0].parameters())  # weight (24) and bias (6)
    H = dense_hessian(model, F.cross_entropy, data)
    v = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    hv = A.hessian_vector_product(model, F.cross_entropy, data, v, params=first)
    torch.testing.assert_close(hv, H[:30, :30] @ v, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("train", [True, False])
def test_hvp_batchnorm_model_matches_dense_hessian_in_both_modes(train):
    model, data = bn_net(), classification_batches([8], in_shape=(1, 6, 6), classes=2)
    model.train(train)
    H = dense_hessian(model, F.cross_entropy, data)
    v = torch.randn(H.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(A.hessian_vector_product(model, F.cross_entropy, data, v), H @ v, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("cache_graph", [True, False])
def test_multi_batch_hessian_is_the_hessian_of_the_size_weighted_mean(cache_graph):
    model = mlp()
    data = classification_batches([3, 5, 8])
    H_weighted = dense_hessian(model, F.cross_entropy, data)
    # the same as the Hessian of the mean over all 16 samples in one batch ...
    x = torch.cat([b[0] for b in data])
    y = torch.cat([b[1] for b in data])
    torch.testing.assert_close(H_weighted, dense_hessian(model, F.cross_entropy, [(x, y)]), rtol=1e-12, atol=1e-13)
    # ... and not the plain average of the three batch Hessians
    H_plain = sum(dense_hessian(model, F.cross_entropy, [b]) for b in data) / 3
    assert (H_plain - H_weighted).abs().max() > 1e-3
    v = torch.randn(H_weighted.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    from sparsam.analysis._common import Objective

    obj = Objective(model, F.cross_entropy, data, cache_graph=cache_graph)
    torch.testing.assert_close(obj.hvp_flat(v), H_weighted @ v, rtol=1e-12, atol=1e-13)
    eigs = A.top_eigenvalues(model, F.cross_entropy, data, k=2, tol=1e-10, cache_graph=cache_graph)
    np.testing.assert_allclose(eigs, torch.linalg.eigvalsh(H_weighted).flip(0)[:2].numpy(), rtol=1e-8)


def test_data_is_read_once_so_a_one_shot_iterator_works():
    model, data = mlp(), classification_batches([4, 4, 4])
    H = dense_hessian(model, F.cross_entropy, data[:2])
    eigs = A.top_eigenvalues(model, F.cross_entropy, iter(data), k=1, n_batches=2, tol=1e-10)
    assert eigs[0] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)


# ---------------------------------------------------------------------------------------------
# Top eigenvalues
# ---------------------------------------------------------------------------------------------


def _expected(eigs: torch.Tensor, k: int, which: str) -> list[float]:
    vals = eigs.tolist()
    key = (lambda t: -t) if which == "LA" else (lambda t: -abs(t))
    return sorted(vals, key=key)[:k]


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_top_eigenvalues_match_eigvalsh_on_an_mlp_with_negative_eigenvalues(method, which):
    model, data = mlp(6), classification_batches([16], seed=0)  # seeds where -0.64 is the 2nd largest |lambda|
    ev = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))
    assert ev.min() < -0.3  # indefinite: LA and LM differ at k = 3
    assert _expected(ev, 3, "LA") != _expected(ev, 3, "LM")
    # power iteration for LA works on H + |mu| I, where LA's 2nd and 3rd (0.479, 0.471) are too close
    # for it to converge in reasonable time: test its k = 1 here (the quadratic test covers k > 1)
    k = 1 if (method, which) == ("power", "LA") else 3
    got = A.top_eigenvalues(model, F.cross_entropy, data, k=k, which=which, method=method, tol=1e-12, n_iter=3000)
    np.testing.assert_allclose(got, _expected(ev, k, which), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("method", ["lanczos", "power"])
@pytest.mark.parametrize("which", ["LA", "LM"])
def test_top_eigenvalues_repeated_and_dominant_negative(method, which):
    # multiplicities (5, 5) and (-7, -7): deflation must find each copy; LM puts -7 first
    eigs = [5.0, 5.0, 3.0, 1.0, 0.5, -0.2, -7.0, -7.0]
    model = quadratic_with_spectrum(eigs)
    got = A.top_eigenvalues(model, mean_output, QUAD_DATA, k=4, which=which, method=method, tol=1e-13, n_iter=3000)
    expected = {"LA": [5.0, 5.0, 3.0, 1.0], "LM": [-7.0, -7.0, 5.0, 5.0]}[which]
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_top_eigenvalues_returns_floats_largest_first_and_eigenvectors():
    model = quadratic_with_spectrum([4.0, 2.0, 1.0, -1.0])
    vals, vecs = A.top_eigenvalues(model, mean_output, QUAD_DATA, k=2, tol=1e-12, return_eigenvectors=True)
    assert all(type(v) is float for v in vals)
    assert vals == sorted(vals, reverse=True)
    for lam, y in zip(vals, vecs):
        torch.testing.assert_close(model.a @ y, lam * y, rtol=1e-8, atol=1e-8)


def test_top_eigenvalues_k_equals_n_recovers_the_whole_spectrum():
    eigs = [3.0, -2.0, 1.0, 0.25, -0.5]
    got = A.top_eigenvalues(quadratic_with_spectrum(eigs), mean_output, QUAD_DATA, k=5, tol=1e-12)
    np.testing.assert_allclose(got, sorted(eigs, reverse=True), atol=1e-10)


def test_lanczos_not_converged_warns_and_returns_an_estimate():
    model, data = mlp(), classification_batches([16])
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        got = A.top_eigenvalues(model, F.cross_entropy, data, n_iter=2, tol=1e-12)
    assert len(got) == 1 and math.isfinite(got[0])


def test_seeded_results_repeat_and_the_global_rng_is_not_used():
    model, data = mlp(), classification_batches([16])
    state = torch.get_rng_state()
    a = A.hessian_trace(model, F.cross_entropy, data, n_samples=5, generator=7)
    b = A.hessian_trace(model, F.cross_entropy, data, n_samples=5, generator=torch.Generator().manual_seed(7))
    c = A.hessian_trace(model, F.cross_entropy, data, n_samples=5, generator=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == b and a != c


# ---------------------------------------------------------------------------------------------
# Trace and spectral density
# ---------------------------------------------------------------------------------------------


def _hutchinson_std(H: torch.Tensor, m: int) -> float:
    """Standard deviation of the mean of m Rademacher samples z^T H z: sqrt(2 (||H||_F^2 - sum H_ii^2) / m)."""
    return math.sqrt(2 * (float((H**2).sum()) - float((H.diagonal() ** 2).sum())) / m)


def test_hutchinson_trace_converges_to_the_exact_trace():
    model, data = mlp(), classification_batches([16])
    H = dense_hessian(model, F.cross_entropy, data)
    m = 4000
    est = A.hessian_trace(model, F.cross_entropy, data, n_samples=m, batch_vectors=500, generator=0)
    std = _hutchinson_std(H, m)
    assert std < 0.05 * abs(float(H.trace()))  # the bound below is tight enough to mean something
    assert abs(est - float(H.trace())) <= 5 * std


def test_trace_does_not_depend_on_batch_vectors():
    model, data = bn_net(), classification_batches([8], in_shape=(1, 6, 6), classes=2)
    a = A.hessian_trace(model, F.cross_entropy, data, n_samples=30, batch_vectors=1)
    b = A.hessian_trace(model, F.cross_entropy, data, n_samples=30, batch_vectors=7)
    assert a == pytest.approx(b, rel=1e-12)


def test_trace_of_a_quadratic_is_exact_when_the_matrix_is_diagonal():
    # z^T A z = tr(A) for every Rademacher z when A is diagonal
    model = Quadratic(
        torch.diag(torch.tensor([3.0, -1.0, 0.5], dtype=torch.float64)),
        torch.zeros(3, dtype=torch.float64),
        torch.ones(3, dtype=torch.float64),
    )
    assert A.hessian_trace(model, mean_output, QUAD_DATA, n_samples=3) == pytest.approx(2.5, abs=1e-14)


def test_spectral_density_integrates_to_one_and_its_mean_is_trace_over_n():
    model, data = mlp(), classification_batches([16])
    H = dense_hessian(model, F.cross_entropy, data)
    n = H.shape[0]
    ev = torch.linalg.eigvalsh(H)
    n_vectors = 24
    sd = A.spectral_density(model, F.cross_entropy, data, n_iter=n + 10, n_vectors=n_vectors, generator=0)
    assert isinstance(sd, A.SpectralDensity) and sd.n_params == n
    assert sd.weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(sd.weights >= 0)
    assert np.trapezoid(sd.density, sd.grid) == pytest.approx(1.0, abs=1e-6)
    # the smoothed density has the same mean as the quadrature measure
    assert np.trapezoid(sd.grid * sd.density, sd.grid) == pytest.approx(sd.mean(), abs=1e-6)
    # with n_iter >= n every Lanczos run reaches an invariant subspace: nodes are exact eigenvalues
    assert np.abs(sd.nodes[:, None] - ev.numpy()[None, :]).min(axis=1).max() < 1e-8
    # the mean is Hutchinson's estimate of tr(H)/n over the start vectors
    tol = 5 * _hutchinson_std(H, n_vectors) / n
    assert abs(sd.mean() - float(H.trace()) / n) <= tol
    assert sd.trace() == pytest.approx(n * sd.mean())
    d = sd.to_dict()
    assert set(d) >= {"nodes", "weights", "grid", "density"} and len(d["grid"]) == 1000


# ---------------------------------------------------------------------------------------------
# Loss landscapes
# ---------------------------------------------------------------------------------------------


def linear_regression():
    """Linear layer without bias, MSE loss: L(w) = mean (x.w - y)^2, H = 2 X^T X / N."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    y = torch.randn(20, 1, generator=g, dtype=torch.float64)
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, 5, generator=g, dtype=torch.float64))
    return model, [(x[:7], y[:7]), (x[7:], y[7:])], x, y


def test_landscape_1d_of_a_quadratic_has_the_analytic_curvature():
    model, data, x, y = linear_regression()
    d = A.random_direction(model, generator=3)
    alphas = np.linspace(-1, 1, 9)
    res = A.loss_landscape_1d(model, F.mse_loss, data, direction=d, alphas=alphas)
    H = 2 * x.T @ x / len(x)
    dv = d[0].reshape(-1)
    w = model.weight.detach().reshape(-1)
    g = 2 * x.T @ (x @ w - y.reshape(-1)) / len(x)
    L0 = float(F.mse_loss(x @ w, y.reshape(-1)))
    expected = L0 + alphas * float(g @ dv) + 0.5 * alphas**2 * float(dv @ H @ dv)
    np.testing.assert_allclose(res["losses"], expected, rtol=1e-12)
    curvature = 2 * np.polyfit(res["alphas"], res["losses"], 2)[0]
    assert curvature == pytest.approx(float(dv @ H @ dv), rel=1e-9)
    assert res["alphas"] == alphas.tolist()


def test_landscape_2d_of_a_quadratic_matches_the_closed_form():
    model, data, x, y = linear_regression()
    d1 = A.random_direction(model, generator=1)
    d2 = A.random_direction(model, generator=2)
    res = A.loss_landscape_2d(model, F.mse_loss, data, directions=(d1, d2), alphas=[-1, 0, 0.5], betas=[-0.5, 0, 1, 2])
    w = model.weight.detach().reshape(-1)
    u, v = d1[0].reshape(-1), d2[0].reshape(-1)
    for i, a in enumerate(res["alphas"]):
        for j, b in enumerate(res["betas"]):
            expected = float(F.mse_loss(x @ (w + a * u + b * v), y.reshape(-1)))
            assert res["losses"][i][j] == pytest.approx(expected, rel=1e-12)
    assert len(res["losses"]) == 3 and len(res["losses"][0]) == 4


@pytest.mark.parametrize("one_d", ["zero", "copy", "filter"])
def test_filter_normalisation_and_the_one_d_policy(one_d):
    model = bn_net()
    d = A.random_direction(model, generator=0, one_d=one_d)
    for dt, p in zip(d, model.parameters()):
        if p.dim() >= 2:  # every filter (slice along dim 0) has its weight filter's norm
            torch.testing.assert_close(dt.flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1), rtol=1e-12, atol=0)
        elif one_d == "zero":
            assert torch.equal(dt, torch.zeros_like(p))
        elif one_d == "copy":
            assert torch.equal(dt, p.detach())
        else:
            assert torch.equal(dt.abs(), p.detach().abs())
    raw = A.random_direction(model, generator=0, normalize=False)
    assert A.filter_normalize(raw, list(model.parameters()), one_d=one_d)[0].shape == raw[0].shape


def test_filter_normalize_zero_weight_filter_gives_zero():
    w = [torch.zeros(2, 3, dtype=torch.float64)]
    w[0][1] = 1.0
    d = A.filter_normalize([torch.ones(2, 3, dtype=torch.float64)], w)
    assert torch.equal(d[0][0], torch.zeros(3, dtype=torch.float64))
    assert float(d[0][1].norm()) == pytest.approx(math.sqrt(3))


def test_linear_interpolation_endpoints_and_restores_the_model():
    model_a, model_b = mlp(0), mlp(1)
    data = classification_batches([6, 10])
    target = mlp(2)
    before = snapshot(target)
    res = A.linear_interpolation(
        target, F.cross_entropy, data, model_a.state_dict(), model_b, alphas=[-0.5, 0.0, 0.5, 1.0, 1.5]
    )
    assert res["losses"][1] == pytest.approx(A.mean_loss(model_a, F.cross_entropy, data), rel=1e-12)
    assert res["losses"][3] == pytest.approx(A.mean_loss(model_b, F.cross_entropy, data), rel=1e-12)
    assert_bitwise_unchanged(target, before)
    default = A.linear_interpolation(target, F.cross_entropy, data, model_a, model_b)
    assert default["alphas"][0] == -0.5 and default["alphas"][-1] == 1.5 and len(default["alphas"]) == 41


def test_linear_interpolation_of_batchnorm_buffers_in_eval_mode():
    a, b, target = bn_net(0), bn_net(1), bn_net(2)
    with torch.no_grad():
        b[1].running_mean.add_(0.5)
    for m in (a, b, target):
        m.eval()
    data = classification_batches([8], in_shape=(1, 6, 6), classes=2)
    before = snapshot(target)
    res = A.linear_interpolation(
        target, F.cross_entropy, data, a.state_dict(), b.state_dict(), alphas=[0.0, 1.0], interpolate_buffers=True
    )
    assert res["losses"][0] == pytest.approx(A.mean_loss(a, F.cross_entropy, data), rel=1e-12)
    assert res["losses"][1] == pytest.approx(A.mean_loss(b, F.cross_entropy, data), rel=1e-12)
    assert_bitwise_unchanged(target, before)
    assert not target.training


# ---------------------------------------------------------------------------------------------
# Sharpness
# ---------------------------------------------------------------------------------------------


def test_first_order_sharpness_of_a_quadratic_is_the_closed_form():
    model = quadratic_with_spectrum([3.0, 1.0, -0.5, 0.2])
    a, b, w = model.a, model.b, model.w.detach()
    g = a @ w + b
    rho = 0.3
    e = rho * g / g.norm()
    expected = float(g @ e + 0.5 * e @ a @ e)  # L(w + e) - L(w) for a quadratic
    assert A.sam_sharpness(model, mean_output, QUAD_DATA, rho) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("a", [[[3.0, 1.0], [1.0, -2.0]], [[1.0, 0.0], [0.0, 5.0]], [[-1.0, 0.5], [0.5, -3.0]]])
def test_projected_ascent_sharpness_reaches_the_maximum_over_the_ball(a):
    a = torch.tensor(a, dtype=torch.float64)
    b = torch.tensor([0.3, -0.2], dtype=torch.float64)
    w0 = torch.tensor([0.5, 0.1], dtype=torch.float64)
    model, rho = Quadratic(a, b, w0), 0.5

    def f(w):
        return 0.5 * ((w @ a) * w).sum(-1) + w @ b

    # dense reference: the circle (maximum of a convex part) and a fine polar grid of the disc
    t = torch.linspace(0, 2 * math.pi, 20001, dtype=torch.float64)
    r = torch.linspace(0, rho, 401, dtype=torch.float64)
    R, T = torch.meshgrid(r, t[::20], indexing="ij")
    pts = torch.cat(
        [
            rho * torch.stack([t.cos(), t.sin()], 1),
            torch.stack([R.cos() * 0 + R * T.cos(), R * T.sin()], -1).reshape(-1, 2),
        ]
    )
    best = float(f(w0 + pts).max() - f(w0))
    first = A.sam_sharpness(model, mean_output, QUAD_DATA, rho, n_steps=1)
    many = A.sam_sharpness(model, mean_output, QUAD_DATA, rho, n_steps=100)
    assert first <= many + 1e-15
    assert many <= best + 1e-6  # every iterate is feasible
    assert many == pytest.approx(best, abs=2e-5)
    assert torch.equal(model.w.detach(), w0)


def test_sharpness_zero_radius_and_stationary_point():
    model = quadratic_with_spectrum([2.0, 1.0])
    assert A.sam_sharpness(model, mean_output, QUAD_DATA, 0.0) == 0.0
    with torch.no_grad():  # exactly at the minimiser w = 0 of 0.5 w^T A w: g = 0, no ascent direction
        model.b.zero_()
        model.w.zero_()
    assert A.sam_sharpness(model, mean_output, QUAD_DATA, 0.1, n_steps=3) == 0.0


# ---------------------------------------------------------------------------------------------
# Models are left as they were: mode, buffers, weights
# ---------------------------------------------------------------------------------------------

TOOLS = {
    "hvp": lambda m, d: A.hessian_vector_product(m, F.cross_entropy, d, torch.ones(90, dtype=torch.float64)),
    "top_eigenvalues": lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, k=2, n_iter=10),
    "top_eigenvalues_power": lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, k=2, n_iter=10, method="power"),
    "trace": lambda m, d: A.hessian_trace(m, F.cross_entropy, d, n_samples=4, batch_vectors=2),
    "density": lambda m, d: A.spectral_density(m, F.cross_entropy, d, n_iter=8),
    "landscape_1d": lambda m, d: A.loss_landscape_1d(m, F.cross_entropy, d, alphas=[-1, 0.5]),
    "landscape_1d_copy": lambda m, d: A.loss_landscape_1d(m, F.cross_entropy, d, alphas=[0.3], one_d="copy"),
    "landscape_2d": lambda m, d: A.loss_landscape_2d(m, F.cross_entropy, d, alphas=[-1, 1], betas=[0.5]),
    "interpolation": lambda m, d: A.linear_interpolation(
        m, F.cross_entropy, d, bn_net(3), bn_net(4), alphas=[0.5], interpolate_buffers=True
    ),
    "sharpness": lambda m, d: A.sam_sharpness(m, F.cross_entropy, d, 0.1, n_steps=3),
    "mean_loss": lambda m, d: A.mean_loss(m, F.cross_entropy, d),
}


@pytest.mark.filterwarnings("ignore:top_eigenvalues.*did not reach tol:RuntimeWarning")
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_batchnorm_model_mode_buffers_and_weights_are_untouched(tool, train):
    model = bn_net()
    model.train(train)
    data = classification_batches([8, 6], in_shape=(1, 6, 6), classes=2)
    before = snapshot(model)
    modes = [m.training for m in model.modules()]
    TOOLS[tool](model, data)
    assert [m.training for m in model.modules()] == modes
    assert_bitwise_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_batchnorm_train_mode_uses_batch_statistics_and_eval_mode_running_statistics():
    model = bn_net()
    data = classification_batches([8], in_shape=(1, 6, 6), classes=2)
    x, y = data[0]
    model.train()
    train_loss = A.mean_loss(model, F.cross_entropy, data)
    model.eval()
    eval_loss = A.mean_loss(model, F.cross_entropy, data)
    with torch.no_grad():
        assert eval_loss == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-14)
    assert abs(train_loss - eval_loss) > 1e-3


class Boom(Exception):
    pass


def failing_loss(after: int):
    calls = [0]

    def loss_fn(out, y):
        calls[0] += 1
        if calls[0] > after:
            raise Boom
        return F.cross_entropy(out, y)

    return loss_fn


@pytest.mark.parametrize(
    "tool",
    [
        lambda m, lf, d: A.loss_landscape_1d(m, lf, d, alphas=[0.1, 0.2, 0.3]),
        lambda m, lf, d: A.loss_landscape_2d(m, lf, d, alphas=[0.1, 0.2], betas=[0.1, 0.2]),
        lambda m, lf, d: A.sam_sharpness(m, lf, d, 0.5, n_steps=4),
        lambda m, lf, d: A.linear_interpolation(
            m, lf, d, bn_net(5), bn_net(6), alphas=[0.2, 0.4, 0.6], interpolate_buffers=True
        ),
    ],
    ids=["landscape_1d", "landscape_2d", "sharpness", "interpolation"],
)
def test_weights_restored_bitwise_on_error(tool):
    model = bn_net()
    data = classification_batches([8], in_shape=(1, 6, 6), classes=2)
    before = snapshot(model)
    with pytest.raises(Boom):
        tool(model, failing_loss(2), data)
    assert_bitwise_unchanged(model, before)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _mlp_data():
    return mlp(), classification_batches([4])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, k=0), r"k=0"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, k=52), r"k=52"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, n_iter=0), r"n_iter=0"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, which="SA"), r"which='SA'"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, method="arnoldi"), r"method='arnoldi'"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, d, tol=-1.0), r"tol=-1.0"),
        (lambda m, d: A.top_eigenvalues(m, F.cross_entropy, [], k=1), r"data is empty"),
        (lambda m, d: A.hessian_trace(m, F.cross_entropy, d, n_samples=0), r"n_samples=0"),
        (lambda m, d: A.hessian_trace(m, F.cross_entropy, d, n_batches=0), r"n_batches=0"),
        (lambda m, d: A.hessian_trace(m, F.cross_entropy, iter([])), r"data is empty"),
        (lambda m, d: A.spectral_density(m, F.cross_entropy, d, n_iter=0), r"n_iter=0"),
        (lambda m, d: A.spectral_density(m, F.cross_entropy, d, n_vectors=0), r"n_vectors=0"),
        (lambda m, d: A.spectral_density(m, F.cross_entropy, d, sigma=0.0), r"sigma=0.0"),
        (lambda m, d: A.hessian_vector_product(m, F.cross_entropy, d, torch.ones(7)), r"\(7,\)"),
        (lambda m, d: A.sam_sharpness(m, F.cross_entropy, d, rho=-0.1), r"rho=-0.1"),
        (lambda m, d: A.sam_sharpness(m, F.cross_entropy, d, n_steps=0), r"n_steps=0"),
        (lambda m, d: A.loss_landscape_1d(m, F.cross_entropy, d, one_d="keep"), r"one_d='keep'"),
        (lambda m, d: A.loss_landscape_1d(m, F.cross_entropy, d, alphas=[]), r"alphas is empty"),
        (
            lambda m, d: A.loss_landscape_1d(m, F.cross_entropy, [(torch.ones(0, 4), torch.ones(0))]),
            r"batch 0 is empty",
        ),
        (lambda m, d: A.mean_loss(m, lambda o, t: o, d), r"scalar"),
        (lambda m, d: A.linear_interpolation(m, F.cross_entropy, d, {}, m.state_dict()), r"'0.weight'"),
    ],
)
def test_bad_input_raises_value_error_naming_the_value(call, match):
    model, data = _mlp_data()
    with pytest.raises(ValueError, match=match):
        call(model, data)


def test_a_single_pair_is_one_batch():
    model, data = _mlp_data()
    assert A.mean_loss(model, F.cross_entropy, data[0]) == A.mean_loss(model, F.cross_entropy, data)


def test_landscapes_inside_an_autocast_region_see_each_point():
    # autocast caches the low-precision cast of each weight for the whole region, keyed by the
    # tensor: without clearing it after each in-place change every point was evaluated at w0
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 8), torch.arange(32) % 3
    data = [(x, y)]
    plain = A.linear_interpolation(a, F.cross_entropy, data, a.state_dict(), b.state_dict(), alphas=[0.0, 1.0])
    plain_1d = A.loss_landscape_1d(a, F.cross_entropy, data, alphas=[0.0, 1.0], generator=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(x)  # a forward in the region fills the cache with the casts of a's weights
        auto = A.linear_interpolation(a, F.cross_entropy, data, a.state_dict(), b.state_dict(), alphas=[0.0, 1.0])
        auto_1d = A.loss_landscape_1d(a, F.cross_entropy, data, alphas=[0.0, 1.0], generator=0)
    for p, q in ((plain["losses"], auto["losses"]), (plain_1d["losses"], auto_1d["losses"])):
        assert p[0] != pytest.approx(p[1], abs=1e-2)  # the two points differ ...
        assert q == pytest.approx(p, abs=2e-2)  # ... and so they do under bf16 autocast
