"""``sparsam demo``: SGD, SAM, SSAM-F and SSAM-D on the built-in digits, side by side.

Each method trains a SmallCNN for a few epochs (preset ``digits-smallcnn-<method>``, fixed seed).
The methods take turns epoch by epoch (A B C D, then D C B A, ...: every run stops after one epoch
and is resumed, bit-exactly), so slow phases of a busy machine hit all of them alike; the time
per step of each method is compared with SGD's epoch by epoch and the median ratio reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from ..train.config import build_config
from ..train.methods import METHODS, method_values

DEFAULT_METHODS = ("sgd", "sam", "ssam-f", "ssam-d")


def main(argv: list[str], prog: str = "sparsam demo") -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train SGD, SAM, SSAM-F and SSAM-D briefly on scikit-learn's digits (no download), print a "
        "comparison table and plot test accuracy against training time. About a minute on two CPU cores.",
        epilog="Its run directories (OUT/<method>) are replaced on every demo run; `sparsam report OUT` reads them.",
        allow_abbrev=False,
    )
    parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output folder (default runs/demo)")
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        metavar="LIST",
        help=f"comma-separated methods among {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--epochs", type=int, default=None, help="epochs per method (default: the preset's, 8)")
    parser.add_argument("--sparsity", type=float, default=None, help="SSAM sparsity (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed shared by every method (default 0)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: fastest for this tiny model, and fair to a busy machine)",
    )
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True, help="write demo.png")
    args = parser.parse_args(argv)

    from ..train.engine import train
    from ..train.presets import get_preset, list_presets
    from ..train.rundir import resolve_dir

    methods = [m for m in args.methods.replace(" ", "").split(",") if m]
    out = resolve_dir(args.out, flag="--out")  # a file, or a path under one, is refused here
    configs = {}
    for m in methods:
        over = {
            **method_values(m),
            "out": str(out / m),
            "seed": args.seed,
            "stop_after": 1,
            "progress": False,
            "threads": args.threads,
        }
        if args.epochs is not None:
            over["epochs"] = args.epochs
        if args.sparsity is not None:
            over["sparsity"] = args.sparsity
        preset = f"digits-smallcnn-{m}"
        base = get_preset(preset).values if preset in list_presets() else get_preset("digits-smallcnn-sgd").values
        configs[m] = build_config([("preset digits-smallcnn", base), ("demo", over)])
    epochs = max(c.epochs for c in configs.values())
    print(
        f"demo: {', '.join(methods)} on digits, SmallCNN, {epochs} epochs each, taking turns; writing {out}",
        file=sys.stderr,
    )
    start = time.perf_counter()
    for epoch in range(epochs):
        order = methods if epoch % 2 == 0 else list(reversed(methods))
        accs: dict[str, Any] = {}
        for m in order:
            if epoch >= configs[m].epochs:
                continue
            r = train(configs[m], resume=epoch > 0, overwrite=epoch == 0, quiet=True, argv=["sparsam", "demo", *argv])
            if r.stopped == "interrupted":
                print("demo interrupted", file=sys.stderr)
                return 130
            accs[m] = r.final_test_acc
        print(
            f"  epoch {epoch + 1}/{epochs}: " + "  ".join(f"{m} {100 * accs[m]:.1f}%" for m in methods if m in accs),
            file=sys.stderr,
        )
    total = time.perf_counter() - start

    from ..train import rundir

    rows = {m: rundir.read_metrics(out / m) for m in methods}
    per_step = {m: [r["epoch_time_s"] / r["steps"] for r in rows[m]] for m in methods}
    ref = "sgd" if "sgd" in methods else methods[0]
    lines = [f"{'method':<8} {'final acc':>9} {'best acc':>9} {'test loss':>9} {'ms/step':>8} {'vs ' + ref.upper():>8}"]
    for m in methods:
        test_accs = [r["test_acc"] for r in rows[m]]
        ratios = [a / b for a, b in zip(per_step[m], per_step[ref])]  # epoch by epoch, side by side
        lines.append(
            f"{m:<8} {100 * test_accs[-1]:>8.2f}% {100 * max(test_accs):>8.2f}% {rows[m][-1]['test_loss']:>9.4f} "
            f"{1000 * statistics.median(per_step[m]):>8.2f} "
            f"{statistics.median(ratios):>7.2f}x"
        )
    print("\n".join(lines))
    print(
        f"(test accuracy and loss on the 360 held-out digits; ms/step: median over epochs; vs {ref.upper()}: median "
        f"of the epoch-by-epoch ratios of time per step; the demo took {total:.0f} s)"
    )
    if args.plot:
        from ..train.figures import plot_accuracy
        from ..train.tables import group_runs

        groups = group_runs([rundir.load_run(out / m) for m in methods])
        plot_accuracy(groups, out / "demo.png", x="time", title="digits, SmallCNN: test accuracy vs training time")
        print(f"plot: {out / 'demo.png'}")
    return 0
