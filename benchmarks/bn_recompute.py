"""Test accuracy of finished runs before and after recomputing their BatchNorm statistics at the
final weights: an exploratory check of the Momentum-SAM comparison (docs/RESULTS.md).

Momentum-SAM's one pass runs at the perturbed weights w~ = w - rho v/|v|, so the BatchNorm running
statistics a run ends with were gathered there, not at the weights that are evaluated. Its authors
recompute them at w after training (one forward-only epoch over the training data in training mode);
``sparsam train`` does not. This script does it for the finished runs of a study ROOT, to every
configuration alike: for each run it loads the final weights (``checkpoint.pt``), evaluates the test
set as saved, resets every BatchNorm layer's statistics, runs the run's training images through the
model once in training mode without gradients (cumulative average, ``momentum=None``), and
evaluates again. It prints the accuracies and the paired differences after recomputation.

    python benchmarks/bn_recompute.py ROOT [--configs sgd,sam,msam,smsam-f] [--seeds 3,4,5,6,7,8]
        [--json FILE]

Not part of either pre-registered plan: its numbers are exploratory.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from dataclasses import asdict
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("sparsam_bench_replication", _HERE / "replication.py")
assert _spec is not None and _spec.loader is not None
replication = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = replication
_spec.loader.exec_module(replication)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Any) -> float:
    model.eval()
    right = seen = 0
    for x, y in batches:
        right += int((model(x).argmax(1) == y).sum())
        seen += int(y.shape[0])
    return right / seen


@torch.no_grad()
def recompute_bn(model: nn.Module, batches: Any) -> int:
    """Reset and re-estimate every BatchNorm layer's statistics as a cumulative average over
    ``batches`` (training mode, no gradients). Returns the number of images seen."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    seen = 0
    for x, _ in batches:
        model(x)
        seen += int(x.shape[0])
    model.eval()
    return seen


_DATA_FIELDS = (
    "data",
    "train_subset",
    "test_subset",
    "subset",
    "subset_seed",
    "label_noise",
    "batch_size",
    "eval_batch_size",
    "folder_mode",
)
_DATA: dict[tuple[str, ...], Any] = {}


def run_one(run_dir: Path) -> dict[str, float]:
    from sparsam.data.device_loader import DeviceLoader
    from sparsam.models import create_model
    from sparsam.runs.checkpoint import read_torch_file
    from sparsam.runs.rundir import read_run_config
    from sparsam.train.config import build_config
    from sparsam.train.loaders import build_data

    cfg = build_config([(f"{run_dir}/config.json", dict(read_run_config(run_dir)["config"]))])
    device = torch.device("cpu")
    # the images and the subsets are the same for every run that names the same data settings
    key = tuple(str(getattr(cfg, f)) for f in _DATA_FIELDS)
    if key not in _DATA:
        _DATA[key] = build_data(cfg, device=device, batch_per_rank=cfg.batch_size)
    data = _DATA[key]
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)
    ckpt = read_torch_file(run_dir / "checkpoint.pt", map_location="cpu")
    model.load_state_dict(ckpt["model"])
    before = accuracy(model, data.test)
    train = DeviceLoader(
        data.train.dataset,
        batch_size=cfg.batch_size,
        shuffle=False,
        device=device,
        mean=data.info["mean"],
        std=data.info["std"],
    )
    recompute_bn(model, train)
    return {"before": before, "after": accuracy(model, data.test), "train_after": accuracy(model, train)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="a study ROOT (its runs/NAME-seedS folders)")
    ap.add_argument("--configs", default="sgd,sam,msam,smsam-f")
    ap.add_argument("--seeds", default="3,4,5,6,7,8")
    ap.add_argument("--json", type=Path, metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    configs = args.configs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    acc: dict[str, dict[int, dict[str, float]]] = {c: {} for c in configs}
    for c in configs:
        for s in seeds:
            d = args.root / "runs" / f"{c}-seed{s}"
            if not (d / "summary.json").is_file():
                print(f"{d}: not finished, left out", file=sys.stderr)
                continue
            acc[c][s] = {k: 100 * v for k, v in run_one(d).items()}
            print(f"{c} seed {s}: {acc[c][s]['before']:.2f} -> {acc[c][s]['after']:.2f}", file=sys.stderr)

    print(
        "| Configuration | Seeds | Test acc as saved (%) | After recomputing BatchNorm (%) | Change "
        "| Training acc at w, recomputed (%) |"
    )
    print("|---|---|---|---|---|---|")
    for c in configs:
        r = acc[c]
        if len(r) < 2:
            continue
        b = [v["before"] for v in r.values()]
        a = [v["after"] for v in r.values()]
        ch = [x - y for x, y in zip(a, b)]
        print(
            f"| {replication.LABELS.get(c, c)} | {','.join(map(str, r))} | {statistics.fmean(b):.2f} "
            f"| {statistics.fmean(a):.2f} | {statistics.fmean(ch):+.2f} "
            f"| {statistics.fmean(v['train_after'] for v in r.values()):.2f} |"
        )
    print()
    print(
        "Paired differences after recomputing (points; mean, 95% t-interval, two-sided p, TOST p against "
        f"±{replication.MARGIN:g} point; exploratory, no correction):"
    )
    print()
    print("| Contrast | n | Mean | 95% interval | p | p (TOST) |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, a_cfg, b_cfg, question in replication.MSAM_CONTRASTS:
        common = sorted(set(acc.get(a_cfg, {})) & set(acc.get(b_cfg, {})))
        diffs = [acc[a_cfg][s]["after"] - acc[b_cfg][s]["after"] for s in common]
        c = replication.paired_stats(replication.Contrast(name, a_cfg, b_cfg, question, diffs, common))
        rows.append(c)
        if c.mean is None:
            continue
        print(
            f"| {name}: {replication.LABELS[a_cfg]} − {replication.LABELS[b_cfg]} | {len(diffs)} | {c.mean:+.2f} "
            f"| {c.lo:+.2f} to {c.hi:+.2f} | {c.p:.3f} | {c.p_tost:.3f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"accuracy": acc, "contrasts": [asdict(c) for c in rows]}, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
