"""Where SAM, SSAM and SGD stall with a constant radius ρ, on the problem of ``convergence.py``.

The decaying-schedule check of ``convergence.py`` shrinks ρ to 0, so every method ends up near a
stationary point of f and the figure cannot tell the methods' rates apart. With ρ held fixed, SAM
follows the gradient at w + e rather than at w, so it settles where ∇f(w + e(w)) ≈ 0, not where
∇f(w) = 0: its exact full-batch ‖∇f(w)‖² stalls at a level set by ρ (and, with a fixed step, by the
mini-batch noise too). SSAM perturbs fewer coordinates (with the full-gradient norm, a shorter
e: ‖e‖ = ρ‖m⊙g‖/‖g‖), so it is expected to stall lower. This script measures those levels.

Setting (``convergence.py``'s problem): a 64-32-10 tanh MLP in float64 on 512 of scikit-learn's
digits, mini-batches of 32 drawn with replacement, SGD without momentum or weight decay as the base,
SSAM at 50% sparsity with a random or a Fisher mask refreshed every 100 steps. ρ is constant; the
step is either constant (η₀/√T_max for all t) or decaying (η₀/√t). Every ``--every`` steps the
exact full-batch ‖∇f(w_t)‖² is recorded. The stall level of a run is the median of the recorded
values over the last quarter of the steps; the table gives its mean ± sample std over seeds and,
per seed, the ratio to SAM's level.

    python benchmarks/convergence_constant_rho.py --out docs/figures --steps 4000 --seeds 0,1,2

Writes ``convergence_constant_rho.png`` and ``.json`` to ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

_spec = importlib.util.spec_from_file_location("sparsam_bench_convergence", Path(__file__).with_name("convergence.py"))
assert _spec is not None and _spec.loader is not None
cv = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cv
_spec.loader.exec_module(cv)

METHODS = cv.METHODS
STEP_RULES = ("constant", "decaying")


def run(
    method: str, seed: int, *, steps: int, rho: float, lr0: float, step_rule: str, every: int, batch: int = 32
) -> list[float]:
    """The exact ‖∇f(w_t)‖² at t = 1, 1 + every, ... for one run with constant ρ."""
    x, y = cv.load_problem()
    model = cv.make_model(seed)
    opt = cv.build_optimizer(method, model, x, y, lr=lr0, rho=rho, seed=seed, mask_every=100)
    g = torch.Generator().manual_seed(10_000 + seed)
    loss_fn = nn.functional.cross_entropy
    out: list[float] = []
    for t in range(1, steps + 1):
        if (t - 1) % every == 0:
            out.append(cv.full_grad_norm2(model, x, y))
        lr = lr0 / math.sqrt(steps) if step_rule == "constant" else lr0 / math.sqrt(t)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(y), (batch,), generator=g)
        xb, yb = x[idx], y[idx]
        opt.zero_grad()
        if method == "sgd":
            loss_fn(model(xb), yb).backward()
            opt.step()
        else:

            def closure(xb: Tensor = xb, yb: Tensor = yb) -> Tensor:
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
    return out


def stall_level(curve: list[float]) -> float:
    """Median of the last quarter of a recorded ‖∇f‖² curve."""
    return float(np.median(curve[-max(1, len(curve) // 4) :]))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"Stall level of the exact ‖∇f(w)‖² (median over the last quarter of {result['steps']} steps), "
        f"constant ρ = {result['rho']:g}; mean ± sample std over seeds {result['seeds']}, and the per-seed "
        "ratio to SAM's level (mean, min-max):",
        "",
        "| Step | Method | Stall level | Ratio to SAM |",
        "|---|---|---|---|",
    ]
    for rule in STEP_RULES:
        levels = {m: [stall_level(result["curves"][rule][m][str(s)]) for s in result["seeds"]] for m in METHODS}
        for m in METHODS:
            v = levels[m]
            ratios = [a / b for a, b in zip(v, levels["sam"])]
            spread = f"{statistics.fmean(v):.3g} ± {statistics.stdev(v):.2g}" if len(v) > 1 else f"{v[0]:.3g}"
            lines.append(
                f"| {rule} | {cv.LABELS[m]} | {spread} | {statistics.fmean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )
    return "\n".join(lines) + "\n"


SMOOTH = 15  # records in the running median of the figure (150 steps at --every 10)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Running median over the last ``window`` values (fewer at the start)."""
    return np.array([np.median(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsam.runs.figures import method_style

    settings = {
        "sgd": {"opt": "sgd"},
        "sam": {"opt": "sam"},
        "ssam-random": {"opt": "ssam", "mask": "random", "sparsity": 0.5},
        "ssam-fisher": {"opt": "ssam", "mask": "fisher", "sparsity": 0.5},
    }
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)  # 900 px: shown at full size
    every = result["every"]
    for ax, rule in zip(axes, STEP_RULES):
        for m in METHODS:
            style = method_style(settings[m])
            raw = np.array([result["curves"][rule][m][str(s)] for s in result["seeds"]])
            curves = np.array([_smooth(c, SMOOTH) for c in raw])  # a running median: the curves are noisy
            ts = 1 + every * np.arange(curves.shape[1])
            med = np.median(curves, axis=0)
            ax.plot(ts, med, color=style.color, label=style.label, linewidth=1.6)
            ax.fill_between(ts, curves.min(axis=0), curves.max(axis=0), color=style.color, alpha=0.12, linewidth=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("step t")
        ax.set_title(f"{rule} step, constant ρ = {result['rho']:g}", fontsize=10)
        ax.set_xlim(100, result["steps"])
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("exact full-batch ‖∇f(w_t)‖²")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(
        "Exact gradient norm with a constant radius (running median over 150 steps; line: median, band: range "
        f"over seeds {', '.join(map(str, result['seeds']))})",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/figures"))
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--lr0", type=float, default=2.0)
    p.add_argument("--every", type=int, default=10, help="record ‖∇f‖² every this many steps")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    result: dict[str, Any] = {"steps": args.steps, "rho": args.rho, "lr0": args.lr0, "every": args.every}
    result["seeds"] = seeds
    result["curves"] = {
        rule: {
            m: {
                str(s): run(m, s, steps=args.steps, rho=args.rho, lr0=args.lr0, step_rule=rule, every=args.every)
                for s in seeds
            }
            for m in METHODS
        }
        for rule in STEP_RULES
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence_constant_rho.json").write_text(json.dumps(result) + "\n")
    plot(result, args.out / "convergence_constant_rho.png")
    print(table(result), end="")
    print(f"figure: {args.out / 'convergence_constant_rho.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
