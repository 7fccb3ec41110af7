"""What one epoch of each configuration of the regime study costs on this machine, side by side.

    python benchmarks/study_time.py --data ../shared/data/cifar10-jpeg --rounds 3 --out study_time.json

The study's own training times (``summary.json``) were measured while other work shared the cores,
so they cannot be compared across runs. This script measures the same configurations on an idle
machine instead: every round trains each configuration for one epoch with the study's settings
(read from ``benchmarks/cifar_study.sh``: its regime ``COMMON`` flags, its main sweep's methods and
sparsities, and its ``VARIANTS``), in a rotated order (round r starts at the r-th configuration),
with ``--epochs 1`` and a 256-image test subset (evaluation is not timed). One epoch has the same
mix of work as the study's 20: the masks are refreshed once per epoch, late-phase SAM
(``--sam-start 0.75``) runs SAM on the last quarter of the steps, LookSAM's and every-k's cycles
repeat within it. Per configuration it prints the training time of the epoch (the engine's
``train_time_s``, data loading included, evaluation excluded) as a ratio to SGD's in the same
round (median and range over rounds) and the compute the optimizer counted (SGD-step equivalents)
as a ratio to SGD's, so counted and measured cost can be compared. SGD at 40 epochs costs twice
SGD by construction and is not run. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "cifar_study.sh"


@dataclass(frozen=True)
class Config:
    name: str  # the study's configuration name (study_table.py's key)
    flags: tuple[str, ...]


def _regime_block(text: str) -> str:
    start = text.index("\nregime)")
    return text[start : text.index("\n  ;;", start)]


def _bash_array(block: str, name: str) -> list[str]:
    """The words of ``NAME=( ... )`` (comments dropped), as bash would split them."""
    m = re.search(rf"\b{name}=\(", block)
    if m is None:
        raise SystemExit(f"{SCRIPT}: no {name}=( ... ) array in the regime block")
    body, quote, braces = [], "", 0
    for line in block[m.end() :].splitlines():
        for i, ch in enumerate(line):
            if not quote and ch == "#" and (i == 0 or line[i - 1].isspace()):
                break  # a comment
            if quote:
                quote = "" if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "{":
                braces += 1
            elif ch == "}":
                braces -= 1
            elif ch == ")" and braces == 0:
                return shlex.split("".join(body))
            body.append(ch)
        body.append("\n")
    raise SystemExit(f"{SCRIPT}: the {name}=( ... ) array is not closed")


def study_configs(script: Path, data: str) -> tuple[list[str], list[Config]]:
    """(common flags, configurations) of the regime study in ``script``."""
    block = _regime_block(script.read_text())
    common = [data if w == "$DATA" else w for w in _bash_array(block, "COMMON") if w != "${EXTRA:-}"]
    m = re.search(r'--root "\$ROOT/runs/main" --methods (\S+) \\\s*\n\s*--sparsities (\S+)', block)
    if m is None:
        raise SystemExit(f"{SCRIPT}: the regime block's main sweep (--methods/--sparsities) was not found")
    methods, sparsities = m.group(1).split(","), m.group(2).split(",")
    from sparsam.train.methods import is_sparse, method_values

    configs: list[Config] = []
    for method in methods:
        values = method_values(method)
        flags = [f"--opt={values['opt']}"] + ([f"--mask={values['mask']}"] if "mask" in values else [])
        if is_sparse(values):
            configs += [Config(f"{method}-s{s}", (*flags, f"--sparsity={s}")) for s in sparsities]
        else:
            configs.append(Config(method, tuple(flags)))
    for entry in _bash_array(block, "VARIANTS"):
        name, _, flags_text = entry.partition("|")
        configs.append(Config(f"variants/{name}", tuple(shlex.split(flags_text))))
    return common, configs


def _time_one(common: list[str], cfg: Config, out: Path, python: str) -> tuple[float, float]:
    """(training time of one epoch in s, counted compute) of one configuration, run in ``out``."""
    cmd = [python, "-m", "sparsam", "train", *common, *cfg.flags, "--epochs", "1", "--test-subset", "256"]
    cmd += ["--seed", "0", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{cfg.name}: sparsam train failed ({done.returncode}):\n{done.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return float(summary["train_time_s"]), float(last["compute"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("DATA", "../shared/data/cifar10-jpeg"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="substrings of configuration names to keep (SGD is always kept)")
    ap.add_argument("--extra", default="", help="flags appended to every run (a smoke test: '--train-subset 256')")
    ap.add_argument("--out", help="also write the numbers to this JSON file")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if not Path(args.data).is_dir():
        raise SystemExit(f"--data {args.data}: not a directory (the JPEG copy of CIFAR-10)")
    common, configs = study_configs(SCRIPT, args.data)
    common += shlex.split(args.extra)
    if args.only:
        configs = [c for c in configs if c.name == "sgd" or any(s in c.name for s in args.only)]
    times: dict[str, list[float]] = {c.name: [] for c in configs}
    compute: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="study_time_") as tmp:
        for r in range(args.rounds):
            order = configs[r % len(configs) :] + configs[: r % len(configs)]
            for cfg in order:
                out = Path(tmp) / f"{cfg.name.replace('/', '_')}-round{r}"
                t, c = _time_one(common, cfg, out, sys.executable)
                times[cfg.name].append(t)
                compute[cfg.name] = c
                print(f"round {r + 1}/{args.rounds}  {cfg.name:24s} {t:7.1f} s", file=sys.stderr, flush=True)
    ratios = {k: [t / s for t, s in zip(v, times["sgd"])] for k, v in times.items()}
    rows = {
        k: {
            "time_s": v,
            "time_vs_sgd": statistics.median(ratios[k]),
            "time_vs_sgd_range": [min(ratios[k]), max(ratios[k])],
            "compute_vs_sgd": compute[k] / compute["sgd"],
        }
        for k, v in times.items()
    }
    print(f"One epoch of each configuration, {args.rounds} rounds, ratios to SGD in the same round:\n")
    print(
        "| Configuration | Counted compute x SGD | Measured time x SGD (median) | range over rounds | SGD epoch (s) |"
    )
    print("|---|---:|---:|---:|---:|")
    for k, row in rows.items():
        lo, hi = row["time_vs_sgd_range"]
        sgd_s = f"{statistics.median(times['sgd']):.1f}" if k == "sgd" else ""
        print(f"| {k} | {row['compute_vs_sgd']:.2f} | {row['time_vs_sgd']:.2f} | {lo:.2f}-{hi:.2f} | {sgd_s} |")
    if args.out:
        meta = {"rounds": args.rounds, "torch_threads": 1, "extra": args.extra, "configs": rows}
        Path(args.out).write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    main()
