"""Does LookSAM's premise hold in a setting? How fast SAM's flat-region component g_v turns.

LookSAM (Liu et al., CVPR 2022) computes SAM's gradient g_s every k steps and, in between, reuses
g_v = g_s − (⟨g, g_s⟩/‖g‖²) g, the part of g_s orthogonal to the plain gradient g, rescaled to
α‖g‖. That is only SAM-like if g_v changes slowly from step to step (the paper shows it for ViTs
at large batches). This script trains with plain SAM (the optimizer LookSAM approximates) in
any `sparsam train` setting and measures, at every step t:

* ``gv/g``: ‖g_v‖ / ‖g‖, the size of SAM's own orthogonal part (LookSAM's reuse adds α);
* ``cos gv lag j``: cos(g_v(t), g_v(t − j)), how much of the stored g_v is still g_v j steps later;
* ``cos old-gv g lag j``: cos(g_v(t − j), g(t)): does the reused part point along the descent
  (negative: it pushes uphill).

    python benchmarks/looksam_stability.py --data ../shared/data/cifar10-jpeg --model resnet18 \\
        --width 16 --train-subset 5000 --augment none --rho 0.1 --weight-decay 5e-4 --threads 1 --steps 78

Every `sparsam train` flag is accepted (the model, the data, ρ, lr, momentum, weight decay and
batch size are used; the lr is held at ``--lr``); ``--steps``, ``--lags`` and ``--json`` are this
script's. It prints a table of window means (docs/RESULTS.md quotes it for the regime study).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparsam import SAM


def _flat(ts: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).to(torch.float64) for t in ts])


def _cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def measure(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    rho: float,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    lags: Sequence[int] = (1, 2, 4),
) -> Iterator[dict[str, Any]]:
    """Train ``model`` with SAM (SGD base) on ``batches``; yield one row per step: ``step``,
    ``gv`` (g_v as one float64 vector over the parameters with a gradient, in ``parameters()``
    order), ``gv/g`` and the cosines of the module docstring for each lag in ``lags``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=momentum, weight_decay=weight_decay, model=model)
    history: list[Tensor] = []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        with opt.ascent_pass():
            F.cross_entropy(model(x), y).backward()
        g = _flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
        opt.first_step(zero_grad=True)
        with opt.descent_pass():
            F.cross_entropy(model(x), y).backward()
        gs = _flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in params)
        opt.second_step()
        gg = g @ g
        gv = gs - (g @ gs) / gg * g if gg > 0 else gs
        row: dict[str, Any] = {"step": t, "gv": gv, "gv/g": float(gv.norm() / g.norm().clamp_min(1e-30))}
        for j in lags:
            if t - j >= 0:
                row[f"cos gv lag {j}"] = _cos(gv, history[t - j])
                row[f"cos old-gv g lag {j}"] = _cos(history[t - j], g)
        history.append(gv)
        yield row


def summarize(rows: Sequence[dict[str, Any]], windows: Sequence[tuple[int, int]]) -> list[dict[str, Any]]:
    """Mean of every scalar column over each ``[lo, hi)`` window of steps (windows with no rows dropped)."""
    out = []
    for lo, hi in windows:
        sel = [r for r in rows if lo <= r["step"] < hi]
        if not sel:
            continue
        keys = [k for k in sel[-1] if k not in ("step", "gv")]
        out.append({"steps": f"{lo}-{hi - 1}", **{k: statistics.fmean(r[k] for r in sel if k in r) for k in keys}})
    return out


def to_markdown(summary: Sequence[dict[str, Any]]) -> str:
    if not summary:
        return "(no steps)\n"
    keys = list(summary[-1])
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for s in summary:
        lines.append("| " + " | ".join(s[k] if k == "steps" else f"{s.get(k, float('nan')):+.3f}" for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _windows(steps: int) -> list[tuple[int, int]]:
    cuts = sorted({0, min(20, steps), steps // 2, steps} - {0}) if steps > 1 else [steps]
    lo, out = 0, []
    for hi in cuts:
        if hi > lo:
            out.append((lo, hi))
            lo = hi
    return out


def _lags(text: str) -> list[int]:
    try:
        lags = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--lags must be comma-separated integers, got {text!r}") from None
    if not lags or min(lags) < 1:
        raise argparse.ArgumentTypeError(f"--lags must be integers >= 1, got {text!r}")
    return lags


def main(argv: list[str] | None = None) -> int:
    from sparsam.cli.train import build_parser, resolve
    from sparsam.models import create_model
    from sparsam.train.loaders import build_data

    parser = build_parser("looksam_stability.py")
    parser.description = "How fast SAM's flat-region component g_v turns along SAM's trajectory (LookSAM's premise)."
    parser.epilog = None
    parser.add_argument("--steps", type=int, default=78, help="SAM steps to measure (default 78: 2 epochs of 5k/128)")
    parser.add_argument("--lags", type=_lags, default=[1, 2, 4], help="comma-separated lags j (default 1,2,4)")
    parser.add_argument("--json", type=Path, help="also write the per-step rows (without g_v) here")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    steps, lags, json_out = args.steps, args.lags, args.json
    if args.resume:
        parser.error("--resume: this script writes no run directory")
    cfg = resolve(args)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    data = build_data(cfg, device=torch.device("cpu"), batch_per_rank=cfg.batch_size)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        n, epoch = 0, 0
        while True:
            data.train.set_epoch(epoch)
            for x, y in data.train:
                if n == steps:
                    return
                yield x, y
                n += 1
            epoch += 1

    model.train()
    rows = []
    for row in measure(
        model,
        batches(),
        rho=cfg.rho,
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        lags=lags,
    ):
        row.pop("gv")
        rows.append(row)
    print(
        f"SAM's g_v along SAM's trajectory: {cfg.model}{f' width {cfg.width}' if cfg.width else ''} on {cfg.data}, "
        f"batch {cfg.batch_size}, "
        f"rho {cfg.rho:g}, lr {cfg.lr:g}, {steps} steps (window means)\n"
    )
    print(to_markdown(summarize(rows, _windows(steps))))
    if json_out is not None:
        json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
