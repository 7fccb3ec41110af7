"""Measured convergence rate of SGD, SAM and SSAM on a small smooth non-convex problem.

The TPAMI / NeurIPS 2022 SSAM papers prove that SSAM, like SAM, reaches an approximate stationary
point of a smooth non-convex loss at the rate O(log T / √T): with step size η_t = η₀/√t and
radius ρ_t = ρ₀/√t, the average of E‖∇f(w_t)‖² over t ≤ T is at most C · log T / √T. This script
measures it on a problem where ∇f can be computed exactly:

- f: the mean cross-entropy of a small MLP with smooth activations (64-32-10, tanh, float64) on a
  fixed, seeded set of 512 of scikit-learn's 8x8 digits (pixels scaled to [0, 1]);
- stochastic gradients: mini-batches of 32 drawn with replacement, seeded;
- methods: SGD (no momentum, no weight decay), SAM, SSAM with a random mask and SSAM with a
  Fisher mask (sparsam.masks), both at 50% sparsity and refreshed every 100 steps;
- after every step the full-batch gradient ‖∇f(w_t)‖² is computed exactly, and the tracked
  quantity is its running minimum min_{t ≤ T} ‖∇f(w_t)‖² (and the running average, the
  theorem's left-hand side).

Two schedules (``--schedules``):

- ``decay`` (the theorem's): η_t = η₀/√t, ρ_t = ρ₀/√t. The schedule does not depend on T, so one
  trajectory of length T_max gives every T.
- ``horizon``: one run per T with the constant η = η₀/√T and ρ = ρ₀/√T (the fixed-horizon form).

Run (one trajectory of 10,000 steps takes about a minute on one CPU core; the horizon schedule
runs every T of the grid from scratch, about 2.3x the steps of one decay trajectory for the default
grid of 4 horizons per decade):

    python benchmarks/convergence.py --out docs/figures --t-max 10000 --seeds 0,1,2 --schedules decay
    python benchmarks/convergence.py --out docs/figures --t-max 10000 --seeds 0,1,2 --schedules horizon

Every finished trajectory (decay) or set of runs (horizon) is cached in ``--cache`` (default
``runs/convergence``) and skipped when the command is run again, so an interrupted run resumes.

Writes ``STEM.png``/``.pdf`` (figure), ``STEM.json`` (settings, per-seed curves, fitted slopes)
and ``STEM.csv`` (method, schedule, seed, T, running min, running mean), where STEM is ``--stem``,
by default ``convergence`` for ``--schedules decay`` and ``convergence_`` + the schedules joined by
``_`` otherwise (``convergence_horizon``), so the two schedules' figures do not overwrite each other.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparsam import SAM, SSAM
from sparsam.masks import FisherMask, RandomMask

METHODS = ("sgd", "sam", "ssam-random", "ssam-fisher")
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "ssam-random": "SSAM, random mask, 50%",
    "ssam-fisher": "SSAM-F (Fisher mask), 50%",
}
SHORT = {"sgd": "SGD", "sam": "SAM", "ssam-random": "SSAM random", "ssam-fisher": "SSAM-F"}
# One colour per method family: SGD grey, SAM black, SSAM-F blue, random masks green.
COLOURS = {"sgd": "#7f7f7f", "sam": "#000000", "ssam-random": "#238b45", "ssam-fisher": "#08519c"}
# Where the curves coincide (they do here, within the seed spread) the line styles keep each one
# visible: SGD wide underneath, then narrower solid, dashed and dotted lines on top of it.
STYLES: dict[str, dict[str, Any]] = {
    "sgd": {"lw": 5.0, "alpha": 0.5, "marker": "o", "ms": 7},
    "sam": {"lw": 2.4, "marker": "s", "ms": 4.5},
    "ssam-random": {"lw": 1.6, "ls": (0, (5, 2)), "marker": "^", "ms": 4},
    "ssam-fisher": {"lw": 1.4, "ls": (0, (1.5, 1.5)), "marker": "x", "ms": 5},
}
SCHEDULES = ("decay", "horizon")
N_IMAGES = 512


def load_problem() -> tuple[Tensor, Tensor]:
    """The fixed training set: 512 of scikit-learn's 8x8 digits, drawn once with seed 0."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float64) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)[:N_IMAGES]
    return x[idx].contiguous(), y[idx].contiguous()


def make_model(seed: int, hidden: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, 10)).double()


def full_grad_norm2(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """‖∇f(w)‖² of the full-batch mean cross-entropy at the model's current weights."""
    params = [p for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params)
    return float(sum(g.pow(2).sum() for g in grads))


def step_size(t: int, base: float, schedule: str, horizon: int) -> float:
    """η_t (or ρ_t) for step t = 1, 2, ...: base/√t (decay) or base/√T (horizon)."""
    if t < 1:
        raise ValueError(f"steps count from 1, got t={t}")
    if schedule == "decay":
        return base / math.sqrt(t)
    if schedule == "horizon":
        return base / math.sqrt(horizon)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def build_optimizer(
    method: str, model: nn.Module, x: Tensor, y: Tensor, *, lr: float, rho: float, seed: int, mask_every: int
) -> torch.optim.Optimizer:
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    if method == "sgd":
        return base
    if method == "sam":
        return SAM(base, rho=rho)
    if method == "ssam-random":
        return SSAM(base, rho=rho, mask=RandomMask(0.5, seed=seed, update_every=mask_every), model=model)
    if method == "ssam-fisher":
        data = [(x[i : i + 64], y[i : i + 64]) for i in range(0, len(y), 64)]
        mask = FisherMask(0.5, num_samples=128, update_every=mask_every, seed=seed)
        return SSAM(base, rho=rho, mask=mask, model=model, loss_fn=nn.functional.cross_entropy, data=data)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def run_trajectory(
    method: str,
    steps: int,
    *,
    seed: int,
    schedule: str = "decay",
    lr0: float = 2.0,
    rho0: float = 0.5,
    batch: int = 32,
    mask_every: int = 100,
    problem: tuple[Tensor, Tensor] | None = None,
    keep_weights: bool = False,
) -> dict[str, Any]:
    """Run ``steps`` steps of ``method`` and record, after every step, the exact ‖∇f(w_t)‖².

    Returns a dict with ``grad_norm2[t-1]`` = ‖∇f(w_t)‖² where w_1 is the initial point and w_t the
    point after t - 1 steps (t = 1..steps), so the T-th entry of ``running_min`` is
    min_{t ≤ T} ‖∇f(w_t)‖²; ``lr``/``rho``: the values the optimizer's group held at each step;
    ``weights`` (with ``keep_weights``): a flat copy of w_t for every t.
    """
    x, y = problem if problem is not None else load_problem()
    model = make_model(seed)
    opt = build_optimizer(method, model, x, y, lr=lr0, rho=rho0, seed=seed, mask_every=mask_every)
    g = torch.Generator().manual_seed(10_000 + seed)
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy
    gn2: list[float] = []
    lrs: list[float] = []
    rhos: list[float] = []
    weights: list[Tensor] = []
    for t in range(1, steps + 1):
        # w_t is the current point: record its exact full-batch gradient norm first.
        gn2.append(full_grad_norm2(model, x, y))
        if keep_weights:
            weights.append(torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()]))
        for group in opt.param_groups:
            group["lr"] = step_size(t, lr0, schedule, steps)
            if method != "sgd":
                group["rho"] = step_size(t, rho0, schedule, steps)
        lrs.append(opt.param_groups[0]["lr"])
        rhos.append(opt.param_groups[0].get("rho", 0.0))
        idx = torch.randint(len(y), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        if method == "sgd":
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        else:

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            opt.zero_grad()
            opt.step(closure)
    gn = np.asarray(gn2)
    out: dict[str, Any] = {
        "method": method,
        "schedule": schedule,
        "seed": seed,
        "steps": steps,
        "grad_norm2": gn.tolist(),
        "running_min": np.minimum.accumulate(gn).tolist(),
        "running_mean": (np.cumsum(gn) / np.arange(1, len(gn) + 1)).tolist(),
        "lr": lrs,
        "rho": rhos,
    }
    if keep_weights:
        out["weights"] = weights
    return out


def t_grid(t_min: int, t_max: int, per_decade: int = 4) -> list[int]:
    """Log-spaced horizons from t_min to t_max (both included)."""
    n = max(2, round(per_decade * math.log10(t_max / t_min)) + 1)
    return sorted({round(v) for v in np.geomspace(t_min, t_max, n)})


def fit_slope(ts: list[int], vals: list[float]) -> float:
    """Least-squares slope of log(vals) against log(T)."""
    return float(np.polyfit(np.log(ts), np.log(vals), 1)[0])


def collect(args: argparse.Namespace) -> dict[str, Any]:
    problem = load_problem()
    grid = t_grid(args.t_min, args.t_max)
    curves: list[dict[str, Any]] = []
    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    for schedule in args.schedules:
        for method in args.methods:
            for seed in args.seeds:
                key = (
                    f"{schedule}-{method}-seed{seed}-T{args.t_min}-{args.t_max}-lr{args.lr0}-rho{args.rho0}"
                    f"-b{args.batch}-m{args.mask_every}.json"
                )
                if (cache / key).exists():
                    curves.append(json.loads((cache / key).read_text()))
                    continue
                if schedule == "decay":
                    r = run_trajectory(
                        method,
                        grid[-1],
                        seed=seed,
                        schedule=schedule,
                        lr0=args.lr0,
                        rho0=args.rho0,
                        batch=args.batch,
                        mask_every=args.mask_every,
                        problem=problem,
                    )
                    mins = [r["running_min"][t - 1] for t in grid]
                    means = [r["running_mean"][t - 1] for t in grid]
                else:
                    mins, means = [], []
                    for t in grid:
                        r = run_trajectory(
                            method,
                            t,
                            seed=seed,
                            schedule=schedule,
                            lr0=args.lr0,
                            rho0=args.rho0,
                            batch=args.batch,
                            mask_every=args.mask_every,
                            problem=problem,
                        )
                        mins.append(r["running_min"][-1])
                        means.append(r["running_mean"][-1])
                curve = {
                    "method": method,
                    "schedule": schedule,
                    "seed": seed,
                    "T": grid,
                    "min_grad_norm2": mins,
                    "mean_grad_norm2": means,
                }
                (cache / key).write_text(json.dumps(curve))
                curves.append(curve)
                print(
                    f"{schedule:8s} {method:12s} seed {seed}: min ||grad f||^2 at T={grid[-1]}: {mins[-1]:.3g}",
                    file=sys.stderr,
                )
    slopes: dict[str, dict[str, dict[str, float]]] = {}
    for schedule in args.schedules:
        slopes[schedule] = {}
        for method in args.methods:
            cs = [c for c in curves if c["method"] == method and c["schedule"] == schedule]
            gm_min = np.exp(np.mean([np.log(c["min_grad_norm2"]) for c in cs], axis=0))
            gm_mean = np.exp(np.mean([np.log(c["mean_grad_norm2"]) for c in cs], axis=0))
            keep = [i for i, t in enumerate(grid) if t >= args.fit_from]
            slopes[schedule][method] = {
                "min": fit_slope([grid[i] for i in keep], [float(gm_min[i]) for i in keep]),
                "mean": fit_slope([grid[i] for i in keep], [float(gm_mean[i]) for i in keep]),
            }
    ref = [math.log(t) / math.sqrt(t) for t in grid]
    keep = [i for i, t in enumerate(grid) if t >= args.fit_from]
    return {
        "settings": {
            "problem": f"digits 8x8 (scikit-learn), {N_IMAGES} images; MLP 64-32-10, tanh, float64; mean cross-entropy",
            "batch": args.batch,
            "lr0": args.lr0,
            "rho0": args.rho0,
            "sparsity": 0.5,
            "mask_every": args.mask_every,
            "seeds": args.seeds,
            "T": grid,
            "fit_from": args.fit_from,
            "schedules": {
                "decay": "lr_t = lr0/sqrt(t), rho_t = rho0/sqrt(t)",
                "horizon": "lr = lr0/sqrt(T), rho = rho0/sqrt(T), constant over a run of T steps",
            },
        },
        "reference_slope": fit_slope([grid[i] for i in keep], [ref[i] for i in keep]),
        # 1/√T: the fixed-horizon rate of SGD's non-convex analysis (no log factor), drawn with horizon.
        "reference_slope_inv_sqrt": fit_slope([grid[i] for i in keep], [grid[i] ** -0.5 for i in keep]),
        "slopes": slopes,
        "curves": curves,
    }


def plot(result: dict[str, Any], out: Path, stem: str = "convergence") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules = list(result["slopes"])
    grid = result["settings"]["T"]
    sched_words = {"decay": "η_t = η₀/√t, ρ_t = ρ₀/√t", "horizon": "η = η₀/√T, ρ = ρ₀/√T (one run per T)"}
    quantities = {
        "min": ("min_grad_norm2", "min over t ≤ T of ‖∇f(w_t)‖²"),
        "mean": ("mean_grad_norm2", "average over t ≤ T of ‖∇f(w_t)‖²"),
    }
    panels = [(sc, q) for sc in schedules for q in quantities]
    # With SGD among the methods, a second row shows every other method's curve divided by SGD's of
    # the same seed (same initial point and batches): where the curves coincide on the log axes
    # above, this is where they can be told apart.
    with_ratio = any(c["method"] == "sgd" for c in result["curves"])
    fig, axes = plt.subplots(
        2 if with_ratio else 1,
        len(panels),
        figsize=(4.6 * len(panels), 6.6 if with_ratio else 4.4),
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [3, 1.3]} if with_ratio else None,
    )
    n_seeds = len(result["settings"]["seeds"])
    ref = np.array([math.log(t) / math.sqrt(t) for t in grid])
    for col, (schedule, q) in enumerate(panels):
        ax = axes[0][col]
        key, ylabel = quantities[q]
        top = 0.0
        slopes: list[tuple[str, str]] = []
        for method, label in LABELS.items():
            cs = [c for c in result["curves"] if c["method"] == method and c["schedule"] == schedule]
            if not cs:
                continue
            if with_ratio and method != "sgd":
                _plot_ratio(axes[1][col], result, schedule, key, method, grid)
            logs = np.log([c[key] for c in cs])
            centre = np.exp(logs.mean(0))
            lo, hi = np.exp(logs.min(0)), np.exp(logs.max(0))
            slope = result["slopes"][schedule][method][q]
            ax.plot(grid, centre, color=COLOURS[method], label=label, **STYLES[method])
            slopes.append((f"{SHORT[method]}: {slope:.2f}", COLOURS[method]))
            ax.fill_between(grid, lo, hi, color=COLOURS[method], alpha=0.12, lw=0)
            top = max(top, float(hi[0]))
        # The bound's shape, drawn through the highest curve's first point: a curve that stays below it
        # falls at least as fast as log T / √T.
        ax.plot(grid, top * ref / ref[0], color="#d62728", ls="--", lw=1.2, label="c · log T / √T (the bound's rate)")
        slopes.append((f"log T / √T: {result['reference_slope']:.2f}", "#d62728"))
        if schedule == "horizon":
            inv = np.array([t**-0.5 for t in grid])
            ax.plot(grid, top * inv / inv[0], color="#ff7f0e", ls=":", lw=1.4, label="c / √T")
            inv_slope = result.get("reference_slope_inv_sqrt", -0.5)
            slopes.append((f"1 / √T: {inv_slope:.2f}", "#ff7f0e"))
        # Slopes in the empty lower-left corner (the curves fall from top left to bottom right).
        for k, (text, colour) in enumerate(reversed(slopes)):
            ax.text(
                0.03, 0.03 + 0.06 * k, text, transform=ax.transAxes, ha="left", va="bottom", fontsize=7.5, color=colour
            )
        ax.text(
            0.03,
            0.03 + 0.06 * len(slopes),
            "log-log slope",
            transform=ax.transAxes,
            ha="left",
            va="bottom",
            fontsize=7.5,
            fontweight="bold",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylabel(ylabel + " (full batch)")
        if with_ratio:
            below = axes[1][col]
            below.axhline(1.0, color=COLOURS["sgd"], lw=3, alpha=0.5)
            below.set_ylabel("÷ SGD, same seed", fontsize=8.5)
            below.grid(True, which="major", alpha=0.3)
            below.set_xlabel("steps T")
        else:
            ax.set_xlabel("steps T")
        ax.set_title(f"{'minimum' if q == 'min' else 'average'}; {sched_words[schedule]}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    # The title states the setting, not a conclusion: what the curves show is read in docs/RESULTS.md.
    how = sched_words[schedules[0]] if len(schedules) == 1 else "η and ρ as in the panel titles"
    fig.suptitle(
        "SGD, SAM and SSAM (random and Fisher masks, 50%): exact full-batch ‖∇f‖² against the number of steps T\n"
        f"tanh MLP on digits; {how}\n"
        f"line: geometric mean, band: min-max over {n_seeds} seeds; slopes: least-squares fits on log-log axes",
        fontsize=9.5,
    )
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=len(legend), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 if with_ratio else 0.07, 1, 0.97 if with_ratio else 0.87))
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{ext}", dpi=150)
    plt.close(fig)


def _plot_ratio(ax: Any, result: dict[str, Any], schedule: str, key: str, method: str, grid: list[int]) -> None:
    """``method``'s curve divided by SGD's of the same seed: geometric mean line, min-max band."""
    by_seed = {c["seed"]: c[key] for c in result["curves"] if c["method"] == "sgd" and c["schedule"] == schedule}
    ratios = [
        np.asarray(c[key]) / np.asarray(by_seed[c["seed"]])
        for c in result["curves"]
        if c["method"] == method and c["schedule"] == schedule and c["seed"] in by_seed
    ]
    if not ratios:
        return
    logs = np.log(ratios)
    style = {k: v for k, v in STYLES[method].items() if k != "ms"}
    ax.plot(grid, np.exp(logs.mean(0)), color=COLOURS[method], ms=3, **{**style, "lw": min(style["lw"], 1.6)})
    ax.fill_between(grid, np.exp(logs.min(0)), np.exp(logs.max(0)), color=COLOURS[method], alpha=0.12, lw=0)


def write_csv(result: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "schedule", "seed", "T", "min_grad_norm2", "mean_grad_norm2"])
        for c in result["curves"]:
            for t, mn, me in zip(c["T"], c["min_grad_norm2"], c["mean_grad_norm2"]):
                w.writerow([c["method"], c["schedule"], c["seed"], t, f"{mn:.6g}", f"{me:.6g}"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--cache", type=Path, default=Path("runs/convergence"), help="finished trajectories")
    p.add_argument("--t-min", type=int, default=100)
    p.add_argument("--t-max", type=int, default=10_000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--schedules", default=",".join(SCHEDULES))
    p.add_argument("--lr0", type=float, default=2.0)
    p.add_argument("--rho0", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mask-every", type=int, default=100)
    p.add_argument("--fit-from", type=int, default=100, help="fit slopes over T >= this")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--stem",
        help="output file name without extension (default: convergence for --schedules decay, "
        "else convergence_ + the schedules joined by _)",
    )
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    args.methods = args.methods.split(",")
    args.schedules = args.schedules.split(",")
    for m in args.methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r} (choose from {', '.join(METHODS)})")
    for s in args.schedules:
        if s not in SCHEDULES:
            p.error(f"unknown schedule {s!r} (choose from {', '.join(SCHEDULES)})")
    if not 1 <= args.t_min < args.t_max:
        p.error(f"need 1 <= --t-min < --t-max, got {args.t_min} and {args.t_max}")
    if sum(t >= args.fit_from for t in t_grid(args.t_min, args.t_max)) < 2:
        p.error(f"--fit-from {args.fit_from} leaves fewer than 2 horizons of {t_grid(args.t_min, args.t_max)} to fit")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result = collect(args)
    stem = args.stem or ("convergence" if args.schedules == ["decay"] else "convergence_" + "_".join(args.schedules))
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_csv(result, args.out / f"{stem}.csv")
    plot(result, args.out, stem)
    print(json.dumps({"reference_slope": result["reference_slope"], "slopes": result["slopes"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
