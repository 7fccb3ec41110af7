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
   sharpness of the final models (mean ± sample std). With ``--time FILE`` (the JSON of
   ``benchmarks/study_time.py``) also the time of one epoch measured on an idle machine, as a
   ratio to SGD's.

    python benchmarks/study_table.py ROOT --time study_time.json --figures DIR

``--figures DIR`` writes two figures (PNG): ``study_accuracy.png``, the per-seed paired difference
of final accuracy to SGD per configuration (mean ± standard error, one colour per method family),
and ``study_cost.png``, the same differences against training compute and, with ``--time``,
against the measured time, both as multiples of SGD's.
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _settings(run: Path) -> dict[str, Any]:
    """The run's configuration (``config.json``'s "config"; empty if absent)."""
    path = run / "config.json"
    return dict(json.loads(path.read_text()).get("config", {})) if path.exists() else {}


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
            "settings": _settings(run),
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


def _table(intro: str, head: list[str], rows: list[list[str]]) -> list[str]:
    return [intro, "", _row(head), "|" + "|".join("---" for _ in head) + "|", *map(_row, rows)]


def _x(value: float | None, fmt: str, suffix: str = "") -> str:
    return "—" if value is None else f"{format(value, fmt)}{suffix}"


def idle_times(path: str | Path | None) -> dict[str, float]:
    """Configuration -> measured epoch time x SGD (benchmarks/study_time.py's JSON); SGD at twice
    the epochs costs twice SGD's."""
    if path is None:
        return {}
    rows = json.loads(Path(path).read_text())["configs"]
    out = {k: float(v["time_vs_sgd"]) for k, v in rows.items()}
    if SGD in out:
        out[f"sgd-2x/{SGD}"] = 2 * out[SGD]
    return out


def tables(base: Path, time_file: str | Path | None = None) -> str:
    runs = finished_runs(base)
    if not runs:
        return f"no finished runs under {base / 'runs'}\n"
    acc_rows, cost_rows = [], []
    by_run, idle = analysis(base), idle_times(time_file)
    for cfg in configs(runs):
        mine = [v for (c, _), v in runs.items() if c == cfg]
        acc_rows.append(
            [
                cfg,
                str(len(mine)),
                mean_std([v["final"] for v in mine], ".2f"),
                mean_std([v["best"] for v in mine], ".2f"),
                *(fmt_diff(paired_diff(runs, cfg, ref, what)) for ref in (SGD, SAM) for what in ("final", "best")),
                _x(_mean_of(runs, cfg, "compute"), ".5g"),
                _x(ratio(runs, cfg, "compute"), ".2f", "x"),
            ]
        )
        found = [by_run[v["dir"]] for v in mine if v["dir"] in by_run]
        cost_rows.append(
            [
                cfg,
                _x(_mean_of(runs, cfg, "time"), ".4g"),
                _x(ratio(runs, cfg, "time"), ".2f", "x"),
                *([_x(idle.get(cfg), ".2f", "x")] if idle else []),
                mean_std([r["top_eigenvalues"][0] for r in found if r.get("top_eigenvalues")], ".3g"),
                mean_std([r["sharpness"] for r in found if r.get("sharpness") is not None], ".3g"),
            ]
        )
    acc_head = ["Configuration", "Seeds", "Final acc (%)", "Best acc (%)", "Final − SGD", "Best − SGD"]
    acc_head += ["Final − SAM", "Best − SAM", "Compute (SGD steps)", "Compute vs SGD"]
    cost_head = ["Configuration", "Train time (s)", "Time vs SGD"] + (["Idle time vs SGD"] if idle else [])
    cost_head += ["Top eigenvalue", "Sharpness (rho 0.05)"]
    lines = _table(
        "Accuracy (mean ± std over seeds), paired differences in points (mean ± standard error over the seeds "
        "where both runs finished) and training compute in SGD-step equivalents (mean over seeds):",
        acc_head,
        acc_rows,
    )
    lines += [""] + _table(
        "Training time (evaluation excluded, mean over seeds; depends on the machine's load while the runs ran"
        + ("; idle: one epoch measured side by side by benchmarks/study_time.py" if idle else "")
        + ") and flatness of the final models (mean ± std over seeds, `sparsam analyze`):",
        cost_head,
        cost_rows,
    )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- figures
def _styles(runs: dict[tuple[str, int], dict[str, Any]], cfgs: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, label) of each configuration, from sparsam's method palette; two configurations of
    one method (LookSAM at two α, ESAM with and without data selection) are told apart by the
    setting that differs, in words, and a colour is not repeated."""
    from sparsam.runs.figures import method_styles

    settings = [next(v["settings"] for (c, _), v in runs.items() if c == cfg) for cfg in cfgs]
    styles = method_styles(settings, keys=_LABEL_KEYS)
    out = {}
    for cfg, setting, style in zip(cfgs, settings, styles):
        if cfg.startswith("sgd-2x/"):  # SGD's grey would repeat: a darker grey, named by its epochs
            out[cfg] = ("0.45", f"SGD, {setting.get('epochs', 2)} epochs (SAM's compute)")
        else:
            out[cfg] = (style.color, style.label)
    return out


_LABEL_KEYS = ("look_alpha", "esam_beta", "esam_gamma")  # settings a label may name (a variant's own)


def _diff_stats(runs: dict[tuple[str, int], dict[str, Any]], cfg: str) -> tuple[float, float, int]:
    """(mean, standard error, n) of the paired final-accuracy difference to SGD (SGD itself: 0, 0)."""
    d = paired_diff(runs, cfg, SGD, "final")
    if cfg == SGD:
        return 0.0, 0.0, len([1 for (c, _) in runs if c == SGD])
    if not d:
        return float("nan"), 0.0, 0
    return statistics.fmean(d), (statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0), len(d)


_FLOOR = -3.0  # points below SGD: lower values are drawn at the axis edge, with their value written


def _floor(stats: dict[str, tuple[float, float, int]]) -> float:
    """The axis' lower end: just below the lowest configuration, but not below _FLOOR."""
    low = min((m - se for m, se, _ in stats.values() if m == m), default=0.0)
    return max(low - 0.4, _FLOOR)


def figures(base: Path, out: Path, time_file: str | Path | None = None) -> list[Path]:
    """study_accuracy.png and study_cost.png (see the module docstring); returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = finished_runs(base)
    if not runs or not any(c == SGD for c, _ in runs):
        raise SystemExit(f"--figures needs finished SGD runs under {base / 'runs'}")
    out.mkdir(parents=True, exist_ok=True)
    cfgs = [c for c in configs(runs) if c == SGD or paired_diff(runs, c, SGD, "final")]
    stats = {c: _diff_stats(runs, c) for c in cfgs}
    styles = _styles(runs, cfgs)
    seeds = sorted({s for (c, s) in runs if c == SGD})
    paths = []

    # 1. The paired differences, best first.
    order = sorted(cfgs, key=lambda c: stats[c][0])
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(order) + 1.4))
    floor = _floor(stats)
    for y, c in enumerate(order):
        mean, se, n = stats[c]
        color, label = styles[c]
        if mean < floor:  # an outlier: at the edge, with its value
            ax.plot(floor, y, marker="<", color=color, markersize=7, linestyle="none")
            ax.annotate(f"{mean:+.1f} (n={n})", (floor, y), xytext=(8, -3), textcoords="offset points", fontsize=7)
            continue
        ax.errorbar(mean, y, xerr=se, fmt="o", color=color, ecolor=color, capsize=3, markersize=6)
        ax.annotate(f"n={n}", (mean, y), xytext=(8, 5), textcoords="offset points", fontsize=7, color="0.35")
    ax.set_xlim(left=floor - 0.3)
    ax.set_yticks(range(len(order)), [styles[c][1] for c in order])
    ax.axvline(0.0, color=styles[SGD][0], linewidth=1, linestyle="--")
    if SAM in stats:
        ax.axvline(stats[SAM][0], color=styles[SAM][0], linewidth=0.8, linestyle=":")
    ax.set_xlabel("final test accuracy − SGD's, same seed (points; mean ± standard error)")
    ax.grid(axis="x", alpha=0.3)
    best = order[-1]
    ax.set_title(
        f"{styles[best][1]} gains most over SGD ({stats[best][0]:+.2f} points)\n"
        f"paired by seed, seeds {', '.join(map(str, seeds))}; dashed: SGD, dotted: SAM; "
        f"◀: below {_FLOOR:g}",
        fontsize=10,
    )
    fig.tight_layout()
    paths.append(out / "study_accuracy.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    # 2. The same differences against cost.
    idle = idle_times(time_file)
    panels = [("compute", "training compute (x SGD's, counted SGD-step equivalents)")]
    if idle:
        panels.append(("idle", "training time (x SGD's, one epoch measured on an idle CPU)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels) + 2.6, 4.4), sharey=True, squeeze=False)
    floor = _floor(stats)
    for ax, (kind, xlabel) in zip(axes[0], panels):
        xs = {c: ratio(runs, c, "compute") if kind == "compute" else idle.get(c) for c in cfgs}
        placed: dict[float, int] = {}  # configurations at the same cost are spread sideways a little
        for c in cfgs:
            x = xs[c]
            if x is None:
                continue
            k = placed[round(x, 2)] = placed.get(round(x, 2), -1) + 1
            mean, se, _ = stats[c]
            color, label = styles[c]
            if mean < floor:  # an outlier: at the edge, with its value
                ax.plot(x, floor, marker="v", color=color, linestyle="none", label=label)
                ax.annotate(f"{mean:+.1f}", (x, floor), xytext=(6, 2), textcoords="offset points", fontsize=7)
                continue
            ax.errorbar(x + 0.012 * k, mean, yerr=se, fmt="o", color=color, ecolor=color, capsize=3, label=label)
        ax.axhline(0.0, color=styles[SGD][0], linewidth=1, linestyle="--")
        ax.axvline(1.3, color="0.6", linewidth=0.8, linestyle=":")
        ax.set_ylim(bottom=floor - 0.3)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        cheap = [c for c in cfgs if c != SGD and xs[c] is not None and xs[c] <= 1.3 and stats[c][2]]
        if cheap:
            top = max(cheap, key=lambda c: stats[c][0])
            ax.set_title(f"best at ≤ 1.3x SGD: {styles[top][1]} ({stats[top][0]:+.2f})", fontsize=9)
        else:
            ax.set_title("no configuration at ≤ 1.3x SGD", fontsize=9)
    axes[0][0].set_ylabel("final test accuracy − SGD's (points)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0 - 2.5 / fig.get_figwidth(), 0.5), fontsize=8)
    fig.suptitle(
        f"Accuracy gained over SGD against cost (mean ± s.e. over seeds {', '.join(map(str, seeds))}; "
        "dotted: 1.3x SGD)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1.0 - 2.6 / fig.get_figwidth(), 1))
    paths.append(out / "study_cost.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths


def main(root: str, *, time_file: str | None = None, figures_dir: str | None = None) -> None:
    print(tables(Path(root), time_file), end="")
    if figures_dir is not None:
        for path in figures(Path(root), Path(figures_dir), time_file):
            print(f"figure: {path}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the study root (benchmarks/cifar_study.sh's ROOT)")
    ap.add_argument("--time", help="benchmarks/study_time.py's JSON: adds the idle-time column and panel")
    ap.add_argument("--figures", metavar="DIR", help="write study_accuracy.png and study_cost.png here")
    args = ap.parse_args()
    main(args.root, time_file=args.time, figures_dir=args.figures)
