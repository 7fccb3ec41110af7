"""benchmarks/convergence.py: the tracked quantity is the running minimum of the exact full-batch
‖∇f(w_t)‖² (checked against a closed-form backward pass written here), and the schedules are
η₀/√t, ρ₀/√t (decay) and η₀/√T, ρ₀/√T (horizon)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")  # the digits data set

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "convergence.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_convergence", _PATH)
conv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = conv
_spec.loader.exec_module(conv)


def reference_grad_norm2(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, hidden: int = 32) -> float:
    """‖∇f‖² of the mean cross-entropy of tanh MLP 64-hidden-10 at flat weights w, by hand (no autograd)."""
    sizes = [(hidden, 64), (hidden,), (10, hidden), (10,)]
    parts, i = [], 0
    for s in sizes:
        n = math.prod(s)
        parts.append(w[i : i + n].reshape(s))
        i += n
    assert i == w.numel()
    w1, b1, w2, b2 = parts
    h = torch.tanh(x @ w1.T + b1)
    z = h @ w2.T + b2
    p = torch.softmax(z, dim=1)
    dz = (p - torch.nn.functional.one_hot(y, 10).to(p.dtype)) / len(y)
    dw2, db2 = dz.T @ h, dz.sum(0)
    dz1 = (dz @ w2) * (1 - h * h)
    dw1, db1 = dz1.T @ x, dz1.sum(0)
    return float(sum(g.pow(2).sum() for g in (dw1, db1, dw2, db2)))


@pytest.fixture(scope="module")
def problem():
    return conv.load_problem()


@pytest.mark.parametrize("method", conv.METHODS)
def test_running_min_of_the_exact_full_batch_gradient(method, problem):
    x, y = problem
    steps = 25
    r = conv.run_trajectory(method, steps, seed=1, lr0=2.0, rho0=0.5, mask_every=10, problem=problem, keep_weights=True)
    ref = np.array([reference_grad_norm2(w, x, y) for w in r["weights"]])
    np.testing.assert_allclose(r["grad_norm2"], ref, rtol=1e-9)
    np.testing.assert_allclose(r["running_min"], np.minimum.accumulate(ref), rtol=1e-9)
    np.testing.assert_allclose(r["running_mean"], np.cumsum(ref) / np.arange(1, steps + 1), rtol=1e-9)
    # The weights moved at every step (the optimizer really stepped), and the gradient changed with them.
    moves = [float((b - a).norm()) for a, b in zip(r["weights"], r["weights"][1:])]
    assert min(moves) > 0
    assert len(set(np.round(ref, 12))) == steps


def test_decay_schedule_is_one_over_sqrt_t(problem):
    r = conv.run_trajectory("sam", 30, seed=0, lr0=2.0, rho0=0.5, problem=problem)
    t = np.arange(1, 31)
    np.testing.assert_allclose(np.array(r["lr"]) * np.sqrt(t), 2.0, rtol=1e-12)
    np.testing.assert_allclose(np.array(r["rho"]) * np.sqrt(t), 0.5, rtol=1e-12)


def test_horizon_schedule_is_one_over_sqrt_T(problem):
    for steps in (16, 36):
        r = conv.run_trajectory("ssam-random", steps, seed=0, schedule="horizon", lr0=3.0, rho0=0.6, problem=problem)
        assert r["lr"] == [3.0 / math.sqrt(steps)] * steps
        assert r["rho"] == [0.6 / math.sqrt(steps)] * steps


def test_sam_step_uses_the_scheduled_rho(problem):
    """One SAM step with rho_t equals a hand-written SAM step at the same batch."""
    x, y = problem
    r = conv.run_trajectory("sam", 2, seed=3, lr0=2.0, rho0=0.5, problem=problem, keep_weights=True)
    w0, w1 = r["weights"]
    g = torch.Generator().manual_seed(10_000 + 3)
    idx = torch.randint(len(y), (32,), generator=g)
    model = conv.make_model(3)
    params = list(model.parameters())

    def grad_at(w: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(w, params)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        return torch.cat([gg.reshape(-1) for gg in torch.autograd.grad(loss, params)])

    g1 = grad_at(w0.clone())
    e = 0.5 * g1 / (g1.norm() + 1e-12)  # rho_1 = rho0 / sqrt(1)
    expected = w0 - 2.0 * grad_at(w0 + e)  # lr_1 = lr0 / sqrt(1)
    torch.testing.assert_close(w1, expected, rtol=1e-10, atol=1e-12)


def test_step_size_and_helpers():
    assert conv.step_size(4, 2.0, "decay", 100) == 1.0
    assert conv.step_size(4, 2.0, "horizon", 100) == 0.2
    with pytest.raises(ValueError, match="t=0"):
        conv.step_size(0, 1.0, "decay", 10)
    with pytest.raises(ValueError, match="'cosine'"):
        conv.step_size(1, 1.0, "cosine", 10)
    grid = conv.t_grid(100, 10_000)
    assert grid[0] == 100 and grid[-1] == 10_000 and grid == sorted(set(grid))
    ts = [10, 100, 1000]
    assert conv.fit_slope(ts, [3.0 * t**-0.5 for t in ts]) == pytest.approx(-0.5)


def test_cli_refuses_a_fit_range_without_points(tmp_path):
    with pytest.raises(SystemExit) as e:
        conv.main(["--out", str(tmp_path), "--t-min", "4", "--t-max", "12", "--fit-from", "100"])
    assert e.value.code == 2


def test_cli_writes_figure_json_and_csv(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    argv = [
        "--out",
        str(out),
        "--cache",
        str(tmp_path / "cache"),
        "--t-min",
        "4",
        "--t-max",
        "12",
        "--seeds",
        "0,1",
        "--methods",
        "sgd,sam",
        "--schedules",
        "decay,horizon",
        "--fit-from",
        "4",
    ]
    rc = conv.main(argv)
    assert rc == 0
    # Both schedules in one figure: the files are named after them, not after the decay figure alone.
    stem = "convergence_decay_horizon"
    assert not (out / "convergence.png").exists()
    for ext in ("png", "pdf", "json", "csv"):
        assert (out / f"{stem}.{ext}").stat().st_size > 0
    rows = (out / f"{stem}.csv").read_text().splitlines()
    grid = conv.t_grid(4, 12)
    assert len(rows) == 1 + 2 * 2 * 2 * len(grid)
    # A cached trajectory is reused: the second call gives identical numbers.
    first = (out / f"{stem}.csv").read_text()
    assert conv.main(argv) == 0
    assert (out / f"{stem}.csv").read_text() == first


def test_cli_one_schedule_per_file_and_horizon_runs_every_T(tmp_path):
    """decay alone writes convergence.*, horizon alone convergence_horizon.*; a horizon entry at T is
    the last running min / mean of its own run of T steps at the constant lr0/√T, rho0/√T."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    common = ["--out", str(out), "--cache", str(tmp_path / "cache"), "--t-min", "4", "--t-max", "12"]
    common += ["--seeds", "0", "--methods", "sam", "--fit-from", "4"]
    assert conv.main([*common, "--schedules", "decay"]) == 0
    assert conv.main([*common, "--schedules", "horizon"]) == 0
    for stem in ("convergence", "convergence_horizon"):
        for ext in ("png", "pdf", "json", "csv"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0
    decay = json.loads((out / "convergence.json").read_text())
    horizon = json.loads((out / "convergence_horizon.json").read_text())
    assert list(decay["slopes"]) == ["decay"] and list(horizon["slopes"]) == ["horizon"]
    (curve,) = horizon["curves"]
    for t, mn, me in zip(curve["T"], curve["min_grad_norm2"], curve["mean_grad_norm2"]):
        r = conv.run_trajectory("sam", t, seed=0, schedule="horizon", lr0=2.0, rho0=0.5)
        assert mn == pytest.approx(r["running_min"][-1], rel=1e-12)
        assert me == pytest.approx(r["running_mean"][-1], rel=1e-12)
    assert horizon["reference_slope_inv_sqrt"] == pytest.approx(-0.5)
