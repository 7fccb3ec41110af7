"""The table of docs/RESULTS.md from a study root (see benchmarks/cifar_study.sh).

    python benchmarks/study_table.py ROOT

Joins ``ROOT/report/report.csv`` (accuracy, time per epoch, time to SGD's accuracy; written by
``sparsam report``) with ``ROOT/analysis-seed*/results.json`` (top Hessian eigenvalue, SAM
sharpness; written by ``sparsam analyze``) by run directory, and prints one Markdown row per
configuration: mean ± sample std over seeds.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def main(root: str) -> None:
    base = Path(root)
    rows = list(csv.DictReader((base / "report" / "report.csv").open(encoding="utf-8")))
    by_run: dict[str, dict] = {}
    for f in sorted(base.glob("analysis-seed*/results.json")):
        for r in json.loads(f.read_text()).values():
            run_dir = str(Path(r["weights"]).parent.resolve())
            by_run[run_dir] = r
    head = ["Method", "Pattern", "Sparsity", "Seeds", "Final acc (%)", "Best acc (%)", "Time/epoch vs SGD",
            "To SGD acc (s)", "Top eigenvalue", "Sharpness (rho 0.05)"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        runs = [str(Path(p).resolve()) for p in row["runs"].split(";") if p]
        found = [by_run[r] for r in runs if r in by_run]
        eig = [r["top_eigenvalues"][0] for r in found if r.get("top_eigenvalues")]
        sharp = [r["sharpness"] for r in found if r.get("sharpness") is not None]
        cfg = json.loads((Path(runs[0]) / "config.json").read_text())["config"]
        pattern = "—"
        if cfg.get("opt") == "ssam" and cfg.get("mask") != "norm":
            pattern = cfg["nm"] if cfg.get("pattern") == "nm" else cfg.get("pattern", "unstructured")
        sparsity = row["sparsity"] if row["sparsity"] and pattern != "—" else "—"
        pct = lambda m, s: "—" if not m else (f"{100 * float(m):.2f}" + (f" ± {100 * float(s):.2f}" if s else ""))  # noqa: E731
        ratio = f"{float(row['time_ratio_vs_sgd']):.2f}x" if row["time_ratio_vs_sgd"] else "—"
        to_sgd = row.get("time_to_sgd_acc_s") or ""
        reached = row.get("runs_reaching_sgd_acc") or "0"
        to_sgd = "not reached" if not to_sgd else f"{float(to_sgd):.0f}" + (
            f" ({reached}/{row['seeds']})" if reached != row["seeds"] else "")
        print("| " + " | ".join([
            row["method"], pattern, sparsity, row["seeds"], pct(row["final_acc_mean"], row["final_acc_std"]),
            pct(row["best_acc_mean"], row["best_acc_std"]), ratio, to_sgd, mean_std(eig, ".3g"),
            mean_std(sharp, ".3g"),
        ]) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
