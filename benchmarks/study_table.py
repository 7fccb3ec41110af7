"""The tables of docs/RESULTS.md from a study root (see benchmarks/cifar_study.sh).

    python benchmarks/study_table.py ROOT

Reads the finished runs under ``ROOT/runs/*/*-seedN/`` (``summary.json``: final and best test
accuracy, training time; the last row of ``metrics.jsonl``: training compute in SGD-step
equivalents) and, where ``sparsam analyze`` has run, ``ROOT/analysis-seed*/results.json`` (top
Hessian eigenvalue, SAM sharpness), and prints two Markdown tables with one row per configuration.
A configuration is a run directory's name without its seed, prefixed by its folder unless that is
``main`` or ``unstructured`` (``sam``, ``ssam-f-s0.5``, ``sgd-2x/sgd``, ``variants/looksam``).

1. Accuracy: final and best test accuracy (mean ± sample std over seeds), the per-seed paired
   differences of final and best accuracy to SGD (``sgd``) and to SAM (``sam``) of the same seed
   (mean ± standard error, sample std / √n, over the seeds where both runs finished), and the
   training compute in SGD-step equivalents (mean over seeds; SGD counts 1 per step, SAM 2, see
   docs/variants.md) with its ratio to SGD's.
2. Cost and flatness: training time (evaluation excluded; mean over seeds) and its ratio to SGD's,
   which depend on the machine's load while the runs ran, and the top Hessian eigenvalue and
   sharpness of the final models (mean ± sample std).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

SGD, SAM = "sgd", "sam"
# Folders whose runs are named by their method alone (the main sweep of each study).
_PLAIN = ("main", "unstructured")


def mean_std(values: list[float], fmt: str) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return format(values[0], fmt)
    return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"


def config_key(run: Path) -> tuple[str, int]:
    """(configuration, seed) of a run directory ``.../FOLDER/NAME-seedN``."""
    name, _, seed = run.name.rpartition("-seed")
    key = name if run.parent.name in _PLAIN else f"{run.parent.name}/{name}"
    return key, int(seed)


def _last_metrics(run: Path) -> dict[str, Any]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return {}
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1]) if lines else {}


def finished_runs(base: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(configuration, seed) -> numbers of every finished run under base/runs: final and best test
    accuracy (%), training compute (SGD-step equivalents, None for runs older than the counter),
    training time (s) and the run directory."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for summary in sorted(base.glob("runs/*/*-seed*/summary.json")):
        run = summary.parent
        s = json.loads(summary.read_text())
        if s.get("final_test_acc") is None:
            continue
        last = _last_metrics(run)
        out[config_key(run)] = {
            "final": 100 * float(s["final_test_acc"]),
            "best": 100 * float(s["best_test_acc"]),
            "compute": None if last.get("compute") is None else float(last["compute"]),
            "time": None if s.get("train_time_s") is None else float(s["train_time_s"]),
            "dir": str(run.resolve()),
        }
    return out


def paired_diff(runs: dict[tuple[str, int], dict[str, Any]], cfg: str, ref: str, what: str) -> list[float]:
    """Per-seed differences runs[cfg][what] - runs[ref][what] over the seeds where both finished."""
    if cfg == ref:
        return []
    return [v[what] - runs[(ref, s)][what] for (c, s), v in sorted(runs.items()) if c == cfg and (ref, s) in runs]


def fmt_diff(d: list[float]) -> str:
    if not d:
        return "—"
    if len(d) == 1:
        return f"{d[0]:+.2f} (1 seed)"
    se = statistics.stdev(d) / len(d) ** 0.5
    return f"{statistics.fmean(d):+.2f} ± {se:.2f} (n={len(d)})"


def _mean_of(runs: dict[tuple[str, int], dict[str, Any]], cfg: str, what: str) -> float | None:
    """Mean of a quantity over a configuration's seeds; None if any seed lacks it."""
    vals = [v[what] for (c, _), v in runs.items() if c == cfg]
    if not vals or any(x is None for x in vals):
        return None
    return statistics.fmean(vals)


def ratio(runs: dict[tuple[str, int], dict[str, Any]], cfg: str, what: str) -> float | None:
    """Mean ``what`` of cfg over the mean of SGD's (None without an SGD run or the numbers)."""
    mine, ref = _mean_of(runs, cfg, what), _mean_of(runs, SGD, what)
    return None if mine is None or not ref else mine / ref


def analysis(base: Path) -> dict[str, dict[str, Any]]:
    """Run directory -> ``sparsam analyze`` results (top eigenvalues, sharpness)."""
    by_run: dict[str, dict[str, Any]] = {}
    for f in sorted(base.glob("analysis-seed*/results.json")):
        for r in json.loads(f.read_text()).values():
            by_run[str(Path(r["weights"]).parent.resolve())] = r
    return by_run


def configs(runs: dict[tuple[str, int], dict[str, Any]]) -> list[str]:
    """SGD, SAM, then the others in alphabetical order."""
    return sorted({k for k, _ in runs}, key=lambda k: (k != SGD, k != SAM, k))


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def tables(base: Path) -> str:
    runs = finished_runs(base)
    if not runs:
        return f"no finished runs under {base / 'runs'}\n"
    head = [
        "Configuration",
        "Seeds",
        "Final acc (%)",
        "Best acc (%)",
        "Final − SGD",
        "Best − SGD",
        "Final − SAM",
        "Best − SAM",
        "Compute (SGD steps)",
        "Compute vs SGD",
    ]
    lines = [
        "Accuracy (mean ± std over seeds), paired differences in points (mean ± standard error over the seeds "
        "where both runs finished) and training compute in SGD-step equivalents (mean over seeds):",
        "",
        _row(head),
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for cfg in configs(runs):
        mine = [v for (c, _), v in runs.items() if c == cfg]
        compute, compute_ratio = _mean_of(runs, cfg, "compute"), ratio(runs, cfg, "compute")
        cells = [
            cfg,
            str(len(mine)),
            mean_std([v["final"] for v in mine], ".2f"),
            mean_std([v["best"] for v in mine], ".2f"),
            fmt_diff(paired_diff(runs, cfg, SGD, "final")),
            fmt_diff(paired_diff(runs, cfg, SGD, "best")),
            fmt_diff(paired_diff(runs, cfg, SAM, "final")),
            fmt_diff(paired_diff(runs, cfg, SAM, "best")),
            "—" if compute is None else f"{compute:.5g}",
            "—" if compute_ratio is None else f"{compute_ratio:.2f}x",
        ]
        lines.append(_row(cells))
    by_run = analysis(base)
    head = ["Configuration", "Train time (s)", "Time vs SGD", "Top eigenvalue", "Sharpness (rho 0.05)"]
    lines += [
        "",
        "Training time (evaluation excluded, mean over seeds; depends on the machine's load while the runs ran) "
        "and flatness of the final models (mean ± std over seeds, `sparsam analyze`):",
        "",
        _row(head),
        "|" + "|".join("---" for _ in head) + "|",
    ]
    for cfg in configs(runs):
        found = [by_run[v["dir"]] for (c, _), v in runs.items() if c == cfg and v["dir"] in by_run]
        eig = [r["top_eigenvalues"][0] for r in found if r.get("top_eigenvalues")]
        sharp = [r["sharpness"] for r in found if r.get("sharpness") is not None]
        t, t_ratio = _mean_of(runs, cfg, "time"), ratio(runs, cfg, "time")
        cells = [
            cfg,
            "—" if t is None else f"{t:.4g}",
            "—" if t_ratio is None else f"{t_ratio:.2f}x",
            mean_std(eig, ".3g"),
            mean_std(sharp, ".3g"),
        ]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def main(root: str) -> None:
    print(tables(Path(root)), end="")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
