"""The table of docs/RESULTS.md from a study root (see benchmarks/cifar_study.sh).

    python benchmarks/study_table.py ROOT

Joins ``ROOT/report/report.csv`` (accuracy, time per epoch, time to SGD's accuracy; written by
``sparsam report``) with ``ROOT/analysis-seed*/results.json`` (top Hessian eigenvalue, SAM
sharpness; written by ``sparsam analyze``) by run directory, and prints one Markdown row per
configuration: mean ± sample std over seeds. Then, from the run directories themselves
(``ROOT/runs/*/*-seedN/summary.json``, finished runs only), the per-seed paired differences of
final and best test accuracy to SGD and to SAM of the same seed: mean ± standard error
(sample std / √n) over the seeds where both runs finished.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

from sparsam.train.methods import is_sparse


def mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def finished_runs(base: Path) -> dict[tuple[str, int], dict[str, float]]:
    """(configuration, seed) -> final/best test accuracy (%) of every finished run under base/runs."""
    out: dict[tuple[str, int], dict[str, float]] = {}
    for summary in sorted(base.glob("runs/*/*-seed*/summary.json")):
        run = summary.parent
        name, _, seed = run.name.rpartition("-seed")
        key = name if run.parent.name in ("main", "unstructured") else f"{run.parent.name}/{name}"
        s = json.loads(summary.read_text())
        if s.get("final_test_acc") is None:
            continue
        out[(key, int(seed))] = {"final": 100 * float(s["final_test_acc"]), "best": 100 * float(s["best_test_acc"])}
    return out


def paired(base: Path) -> None:
    runs = finished_runs(base)
    if not runs:
        print("\nno finished runs under", base / "runs")
        return
    configs = sorted({k for k, _ in runs}, key=lambda k: (k != "sgd", k != "sam", k))
    head = [
        "Configuration",
        "Seeds",
        "Final acc (%)",
        "Best acc (%)",
        "Final - SGD",
        "Best - SGD",
        "Final - SAM",
        "Best - SAM",
    ]
    print("\nPaired differences (points; mean ± standard error over the seeds where both runs finished):\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")

    def diff(cfg: str, ref: str, what: str) -> str:
        d = [runs[(cfg, s)][what] - runs[(ref, s)][what] for (c, s) in runs if c == cfg and (ref, s) in runs]
        if not d or cfg == ref:
            return "—"
        if len(d) == 1:
            return f"{d[0]:+.2f} (1 seed)"
        se = statistics.stdev(d) / len(d) ** 0.5
        return f"{statistics.fmean(d):+.2f} ± {se:.2f} (n={len(d)})"

    for cfg in configs:
        final = [v["final"] for (c, _), v in runs.items() if c == cfg]
        best = [v["best"] for (c, _), v in runs.items() if c == cfg]
        print(
            "| "
            + " | ".join(
                [
                    cfg,
                    str(len(final)),
                    mean_std(final, ".2f"),
                    mean_std(best, ".2f"),
                    diff(cfg, "sgd", "final"),
                    diff(cfg, "sgd", "best"),
                    diff(cfg, "sam", "final"),
                    diff(cfg, "sam", "best"),
                ]
            )
            + " |"
        )


def main(root: str) -> None:
    base = Path(root)
    if not (base / "report" / "report.csv").exists():
        paired(base)
        return
    rows = list(csv.DictReader((base / "report" / "report.csv").open(encoding="utf-8")))
    by_run: dict[str, dict] = {}
    for f in sorted(base.glob("analysis-seed*/results.json")):
        for r in json.loads(f.read_text()).values():
            run_dir = str(Path(r["weights"]).parent.resolve())
            by_run[run_dir] = r
    head = [
        "Method",
        "Pattern",
        "Sparsity",
        "Seeds",
        "Final acc (%)",
        "Best acc (%)",
        "Time/epoch vs SGD",
        "To SGD acc (s)",
        "Top eigenvalue",
        "Sharpness (rho 0.05)",
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        runs = [str(Path(p).resolve()) for p in row["runs"].split(";") if p]
        found = [by_run[r] for r in runs if r in by_run]
        eig = [r["top_eigenvalues"][0] for r in found if r.get("top_eigenvalues")]
        sharp = [r["sharpness"] for r in found if r.get("sharpness") is not None]
        cfg = json.loads((Path(runs[0]) / "config.json").read_text())["config"]
        pattern = "—"
        if is_sparse(cfg):  # the method has a mask with a sparsity (sparsam.train.methods)
            pattern = cfg["nm"] if cfg.get("pattern") == "nm" else cfg.get("pattern", "unstructured")
        sparsity = row["sparsity"] if row["sparsity"] and pattern != "—" else "—"
        pct = lambda m, s: "—" if not m else (f"{100 * float(m):.2f}" + (f" ± {100 * float(s):.2f}" if s else ""))
        ratio = f"{float(row['time_ratio_vs_sgd']):.2f}x" if row["time_ratio_vs_sgd"] else "—"
        to_sgd = row.get("time_to_sgd_acc_s") or ""
        reached = row.get("runs_reaching_sgd_acc") or "0"
        to_sgd = (
            "not reached"
            if not to_sgd
            else f"{float(to_sgd):.0f}" + (f" ({reached}/{row['seeds']})" if reached != row["seeds"] else "")
        )
        print(
            "| "
            + " | ".join(
                [
                    row["method"],
                    pattern,
                    sparsity,
                    row["seeds"],
                    pct(row["final_acc_mean"], row["final_acc_std"]),
                    pct(row["best_acc_mean"], row["best_acc_std"]),
                    ratio,
                    to_sgd,
                    mean_std(eig, ".3g"),
                    mean_std(sharp, ".3g"),
                ]
            )
            + " |"
        )
    paired(base)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
