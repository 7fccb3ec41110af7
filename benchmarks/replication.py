"""The pre-registered replication of docs/RESULTS.md ("Replication: plan"): its tables and figures.

    python benchmarks/replication.py ROOT [--figures DIR] [--json FILE]
    python benchmarks/replication.py ROOT --study msam [--figures DIR] [--json FILE]

Reads the finished runs ``ROOT/runs/NAME-seedS/`` that ``bash benchmarks/cifar_study.sh replication
ROOT`` writes (``summary.json``: final test accuracy; the last line of ``metrics.jsonl``: counted
compute in SGD-step equivalents) and prints, in Markdown:

1. one row per configuration: seeds finished, final test accuracy (mean ± sample std, %), counted
   compute as a multiple of SGD's at the base epochs;
2. one row per pre-registered contrast (paired by seed): n, mean difference in points, its 95%
   t-interval, the two-sided paired t-test's p-value, the Holm-corrected p over the contrasts, the
   TOST p against ±``MARGIN`` points, and the verdict in the plan's words.

``--figures DIR`` writes ``replication_contrasts.png`` (every seed's paired difference as a dot
beside the mean and its 95% interval, the ±1-point margin shaded) and ``replication_accuracy.png``
(every configuration's final accuracy, seeds as dots, mean and 95% interval, its compute in the
label). ``--json FILE`` writes the numbers.

``--study msam`` does the same for the pre-registered Momentum-SAM comparison of docs/RESULTS.md
("Momentum-SAM at SGD's price: plan"): the runs ``msam`` and ``smsam-f`` that ``cifar_study.sh msam
ROOT`` writes beside the replication's ``sgd`` and ``sam``, contrasts M1-M3 (Holm over these three),
figures ``msam_contrasts.png`` and ``msam_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: the pre-registered contrasts (name, minuend, subtrahend, question), in the plan's order
CONTRASTS: tuple[tuple[str, str, str, str], ...] = (
    ("C1", "sam", "sgd-2x", "SAM against SGD at SAM's compute"),
    ("C2", "ssam-f", "sam", "SSAM-F 50% against SAM"),
    ("C3", "ssam-f-masked", "sam", "SSAM-F 50%, SAM's radius, against SAM"),
    ("C4", "sam-asc", "sgd-1.25x", "quarter-batch ascent against SGD at equal compute"),
    ("C5", "ssam-f-asc", "sgd-1.25x", "SSAM-F 50% + quarter-batch ascent against SGD at equal compute"),
    ("C6", "sam", "sgd", "SAM against SGD at equal epochs"),
)
CONFIGS = ("sgd", "sgd-1.25x", "sgd-2x", "sam", "ssam-f", "ssam-f-masked", "sam-asc", "ssam-f-asc")
#: labels in words
LABELS = {
    "sgd": "SGD",
    "sgd-1.25x": "SGD, 1.25x epochs",
    "sgd-2x": "SGD, 2x epochs",
    "sam": "SAM",
    "ssam-f": "SSAM-F, 50%",
    "ssam-f-masked": "SSAM-F, 50%, SAM's radius",
    "sam-asc": "SAM, quarter-batch ascent",
    "ssam-f-asc": "SSAM-F, 50%, quarter-batch ascent",
}
#: the Momentum-SAM comparison's contrasts and configurations (its own plan, its own Holm family)
MSAM_CONTRASTS: tuple[tuple[str, str, str, str], ...] = (
    ("M1", "msam", "sgd", "MSAM against SGD at equal compute"),
    ("M2", "smsam-f", "sgd", "sparse MSAM against SGD at equal compute"),
    ("M3", "msam", "sam", "MSAM against SAM (2x its compute)"),
)
MSAM_CONFIGS = ("sgd", "sam", "msam", "smsam-f")
LABELS.update({"msam": "MSAM", "smsam-f": "sparse MSAM, Fisher 50%"})


@dataclass(frozen=True)
class Study:
    """What one pre-registered comparison reads and draws."""

    contrasts: tuple[tuple[str, str, str, str], ...]
    configs: tuple[str, ...]
    prefix: str  # of the figure files


STUDIES = {
    "replication": Study(CONTRASTS, CONFIGS, "replication"),
    "msam": Study(MSAM_CONTRASTS, MSAM_CONFIGS, "msam"),
}
MARGIN = 1.0  # points: the equivalence margin of the plan
ALPHA = 0.05


def t_quantile(p: float, df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(p, df))


def t_sf(x: float, df: int) -> float:
    """P(T > x) for Student's t with ``df`` degrees of freedom."""
    from scipy import stats

    return float(stats.t.sf(x, df))


@dataclass
class Contrast:
    name: str
    a: str
    b: str
    question: str
    diffs: list[float]  # per seed, points
    seeds: list[int]
    mean: float | None = None
    se: float | None = None
    lo: float | None = None  # 95% t-interval
    hi: float | None = None
    p: float | None = None  # two-sided paired t-test
    p_holm: float | None = None
    p_tost: float | None = None  # max of the two one-sided p-values against ±MARGIN
    verdict: str = "not resolved"


def paired_stats(c: Contrast) -> Contrast:
    """Mean, 95% t-interval, two-sided p and TOST p of the paired differences (n >= 2)."""
    n = len(c.diffs)
    if n < 2:
        return c
    mean, sd = statistics.fmean(c.diffs), statistics.stdev(c.diffs)
    se = sd / math.sqrt(n)
    half = t_quantile(1 - ALPHA / 2, n - 1) * se
    c.mean, c.se, c.lo, c.hi = mean, se, mean - half, mean + half
    if se == 0:
        c.p = 0.0 if mean != 0 else 1.0
        c.p_tost = 0.0 if abs(mean) < MARGIN else 1.0
        return c
    c.p = 2 * t_sf(abs(mean) / se, n - 1)
    # TOST: H0 mean <= -MARGIN (test upward) and H0 mean >= +MARGIN (test downward)
    c.p_tost = max(t_sf((mean + MARGIN) / se, n - 1), t_sf((MARGIN - mean) / se, n - 1))
    return c


def holm(ps: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values (None stays None and is not counted)."""
    idx = sorted((i for i, p in enumerate(ps) if p is not None), key=lambda i: ps[i])  # type: ignore[arg-type,return-value]
    m = len(idx)
    out: list[float | None] = [None] * len(ps)
    running = 0.0
    for rank, i in enumerate(idx):
        p = ps[i]
        assert p is not None
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def verdict(c: Contrast) -> str:
    if c.p_holm is not None and c.p_holm < ALPHA and c.mean is not None:
        return "above" if c.mean > 0 else "below"
    if c.p_tost is not None and c.p_tost < ALPHA:
        return f"level (within ±{MARGIN:g})"
    return "not resolved"


def load_runs(root: Path) -> dict[tuple[str, int], dict[str, Any]]:
    """(configuration, seed) -> final accuracy (%) and counted compute, for finished runs."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for summary in sorted((root / "runs").glob("*-seed*/summary.json")):
        run = summary.parent
        name, _, seed = run.name.rpartition("-seed")
        s = json.loads(summary.read_text())
        if not s.get("finished") or s.get("final_test_acc") is None:
            continue
        lines = (run / "metrics.jsonl").read_text().splitlines()
        last = json.loads(lines[-1]) if lines else {}
        out[(name, int(seed))] = {"acc": 100.0 * float(s["final_test_acc"]), "compute": last.get("compute")}
    return out


def contrasts(runs: dict[tuple[str, int], dict[str, Any]], study: Study = STUDIES["replication"]) -> list[Contrast]:
    cs = []
    for name, a, b, q in study.contrasts:
        seeds = sorted(s for (c, s) in runs if c == a and (b, s) in runs)
        diffs = [runs[(a, s)]["acc"] - runs[(b, s)]["acc"] for s in seeds]
        cs.append(paired_stats(Contrast(name, a, b, q, diffs, seeds)))
    for c, p in zip(cs, holm([c.p for c in cs])):
        c.p_holm = p
        c.verdict = verdict(c)
    return cs


def _compute_ratio(runs: dict[tuple[str, int], dict[str, Any]], cfg: str) -> float | None:
    def mean(c: str) -> float | None:
        v = [r["compute"] for (k, _), r in runs.items() if k == c]
        return statistics.fmean(v) if v and all(x is not None for x in v) else None

    mine, ref = mean(cfg), mean("sgd")
    return None if mine is None or not ref else mine / ref


def _f(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def _p(x: float | None) -> str:
    return "—" if x is None else ("< 0.001" if x < 0.001 else f"{x:.3f}")


def tables(runs: dict[tuple[str, int], dict[str, Any]], study: Study = STUDIES["replication"]) -> str:
    lines = [
        "Final test accuracy per configuration (mean ± sample std over the finished seeds) and counted "
        "compute as a multiple of SGD's:",
        "",
        "| Configuration | Seeds | Final acc (%) | Compute vs SGD |",
        "|---|---|---|---|",
    ]
    for cfg in study.configs:
        accs = [r["acc"] for (c, _), r in sorted(runs.items()) if c == cfg]
        seeds = sorted(s for (c, s) in runs if c == cfg)
        acc = (
            "—"
            if not accs
            else (
                f"{accs[0]:.2f}" if len(accs) == 1 else f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}"
            )
        )
        lines.append(
            f"| {LABELS[cfg]} | {','.join(map(str, seeds)) or '—'} | {acc} | {_f(_compute_ratio(runs, cfg), '.2f')} |"
        )
    lines += [
        "",
        "Pre-registered contrasts, paired by seed, final test accuracy in points: mean, 95% t-interval, "
        f"two-sided paired t-test p, Holm-corrected p over the {len(study.contrasts)} contrasts, TOST p against "
        f"±{MARGIN:g} point:",
        "",
        "| # | Contrast | n | Mean | 95% interval | p | p (Holm) | p (TOST ±1) | Verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in contrasts(runs, study):
        interval = "—" if c.lo is None else f"{c.lo:+.2f} to {c.hi:+.2f}"
        lines.append(
            f"| {c.name} | {LABELS[c.a]} − {LABELS[c.b]} | {len(c.diffs)} | {_f(c.mean, '+.2f')} | {interval} | "
            f"{_p(c.p)} | {_p(c.p_holm)} | {_p(c.p_tost)} | {c.verdict} |"
        )
    return "\n".join(lines) + "\n"


def figures(
    runs: dict[tuple[str, int], dict[str, Any]], out: Path, study: Study = STUDIES["replication"]
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsam.runs.figures import method_style

    settings = {
        "sgd": {"opt": "sgd"},
        "sgd-1.25x": {"opt": "sgd"},
        "sgd-2x": {"opt": "sgd"},
        "sam": {"opt": "sam"},
        "ssam-f": {"opt": "ssam", "mask": "fisher", "sparsity": 0.5},
        "ssam-f-masked": {"opt": "ssam", "mask": "fisher", "sparsity": 0.5},
        "sam-asc": {"opt": "sam", "ascent_fraction": 0.25},
        "ssam-f-asc": {"opt": "ssam", "mask": "fisher", "sparsity": 0.5, "ascent_fraction": 0.25},
        "msam": {"opt": "msam"},
        "smsam-f": {"opt": "smsam", "mask": "fisher", "sparsity": 0.5},
    }
    # one colour each: the project's method colours where one method appears once, shades otherwise
    colour = {k: method_style(v).color for k, v in settings.items()}
    colour.update({"sgd-1.25x": "#5f5f5f", "sgd-2x": "#b5b5b5", "ssam-f-masked": "#6baed6", "ssam-f-asc": "#8c6bb1"})
    colour.update({"msam": "#d95f02", "smsam-f": "#1b9e77"})
    row_colour = {c[0]: colour[c[1]] for c in study.contrasts}
    row_colour.update({"C1": "#4d4d4d", "M3": "#7a3b00"})  # C1 and C6 both start from SAM, M1 and M3 from MSAM
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    seeds_all = sorted({s for _, s in runs})
    seed_text = f"seeds {', '.join(map(str, seeds_all))}" if seeds_all else "no finished seeds"

    cs = contrasts(runs, study)
    fig, ax = plt.subplots(figsize=(6.8, 0.62 * len(cs) + 1.5))
    for row, c in enumerate(reversed(cs)):
        y = row
        ax.scatter(c.diffs, [y + 0.18] * len(c.diffs), s=16, color=row_colour[c.name], alpha=0.55, zorder=3)
        if c.mean is not None and c.lo is not None and c.hi is not None:
            err = [[c.mean - c.lo], [c.hi - c.mean]]
            ax.errorbar(c.mean, y - 0.08, xerr=err, fmt="o", color=row_colour[c.name], capsize=4, zorder=4)
    ax.axvspan(-MARGIN, MARGIN, color="0.92", zorder=0)
    ax.axvline(0, color="0.4", linewidth=0.8)
    ax.set_yticks(range(len(cs)))
    ax.set_yticklabels([f"{c.name}: {LABELS[c.a]} − {LABELS[c.b]}" for c in reversed(cs)], fontsize=10)
    ax.set_xlabel("difference in final test accuracy (points)", fontsize=10)
    fig.suptitle(
        f"Paired differences in final test accuracy\n(dots: {seed_text}; bars: 95% interval; "
        f"grey band: the ±{MARGIN:g} point equivalence margin)",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    paths.append(out / f"{study.prefix}_contrasts.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    configs = study.configs
    fig, ax = plt.subplots(figsize=(6.8, 0.55 * len(configs) + 1.4))
    for row, cfg in enumerate(reversed(configs)):
        accs = [r["acc"] for (c, _), r in sorted(runs.items()) if c == cfg]
        ax.scatter(accs, [row + 0.15] * len(accs), s=16, color=colour[cfg], alpha=0.55, zorder=3)
        if len(accs) >= 2:
            m, se = statistics.fmean(accs), statistics.stdev(accs) / math.sqrt(len(accs))
            half = t_quantile(1 - ALPHA / 2, len(accs) - 1) * se
            ax.errorbar(m, row - 0.1, xerr=half, fmt="o", color=colour[cfg], capsize=4, zorder=4)
    labels = []
    for cfg in reversed(configs):
        r = _compute_ratio(runs, cfg)
        labels.append(f"{LABELS[cfg]} ({r:.2f}x)" if r is not None else LABELS[cfg])
    ax.set_yticks(range(len(configs)))
    ax.set_yticklabels(labels, fontsize=10)
    ax.set_xlabel("final test accuracy (%)", fontsize=10)
    fig.suptitle(
        f"Final test accuracy, counted compute vs SGD in brackets\n(dots: {seed_text}; bars: 95% interval)", fontsize=10
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    paths.append(out / f"{study.prefix}_accuracy.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path, help="the replication's ROOT (cifar_study.sh replication ROOT)")
    ap.add_argument("--figures", type=Path, metavar="DIR", help="write the two figures here")
    ap.add_argument("--json", type=Path, metavar="FILE", help="write the numbers as JSON")
    ap.add_argument(
        "--study",
        choices=sorted(STUDIES),
        default="replication",
        help="which pre-registered comparison (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    study = STUDIES[args.study]
    runs = load_runs(args.root)
    print(tables(runs, study), end="")
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in contrasts(runs, study)], indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.figures:
        for path in figures(runs, args.figures, study):
            print(f"figure: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
