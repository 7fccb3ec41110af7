"""Run directories -> a results table like the papers' (mean ± std over seeds).

Runs are grouped by their configuration minus the seed; every group is one row. Columns: the
settings that tell groups apart (method, sparsity, and any other key that differs between groups),
the number of seeds, final and best test accuracy (mean ± sample std, in %), epochs done, time
per epoch (median over the run's epochs, mean over seeds) and its ratio to the SGD group with the
same data, model and batch settings. No plotting here: see ``sparsam.runs.figures``.

One precision rule for every table (Markdown and LaTeX; the CSV keeps full precision): accuracy in
percent with two decimals; measured times to three significant digits (``0.250``, ``0.514``,
``12.0``); ratios to SGD with two decimals (``2.13x``); counted compute as a whole number.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..train.config import IDENTITY_KEYS, TrainConfig
from ..train.methods import OPTIMIZERS, is_sparse, method_label, method_order, relevant
from .rundir import RunRecord

# Keys that do not split groups: the seed (what we average over) and run control.
_NOT_GROUPING = {"seed"}
# Keys an SGD reference must share with a group for a time ratio to mean something.
_TIME_KEYS = (
    "data",
    "model",
    "width",
    "batch_size",
    "accum",
    "amp",
    "channels_last",
    "compile",
    "train_subset",
    "base",
    "image_size",
)


def _relevant(cfg: dict[str, Any]) -> dict[str, Any]:
    """The identity settings that affect this run: keys owned by other methods (the registry,
    ``sparsam.train.methods``, says which) are dropped."""
    defaults = TrainConfig().to_dict()
    out = {k: cfg.get(k, defaults[k]) for k in IDENTITY_KEYS if k not in _NOT_GROUPING}
    return {k: v for k, v in out.items() if relevant(k, out)}


@dataclass
class Group:
    key: tuple[tuple[str, Any], ...]
    settings: dict[str, Any]
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        return method_label(self.settings)


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
    groups: dict[tuple[tuple[str, Any], ...], Group] = {}
    for run in runs:
        settings = _relevant(run.config)
        key = tuple(sorted((k, _freeze(v)) for k, v in settings.items()))
        groups.setdefault(key, Group(key, settings)).runs.append(run)
    return sorted(groups.values(), key=lambda g: (method_order(g.settings), str(g.key)))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_numbers(run: RunRecord) -> dict[str, Any]:
    """Final / best test accuracy, epochs done and median epoch time of one run."""
    rows = run.metrics
    if not rows:
        return {"final": None, "best": None, "epochs_done": 0, "epoch_time": None, "compute": None}
    return {
        "final": rows[-1]["test_acc"],
        "best": max((r["test_acc"] for r in rows if r["test_acc"] is not None), default=None),
        "epochs_done": rows[-1]["epoch"],
        "epoch_time": _median([r["epoch_time_s"] for r in rows]),
        "compute": rows[-1].get("compute"),  # SGD-step equivalents so far (runs older than the counter: None)
    }


def summarize(runs: Sequence[RunRecord]) -> tuple[list[str], list[dict[str, Any]]]:
    """(setting columns that vary, one row per group with the aggregated numbers)."""
    groups = group_runs(runs)
    varying: list[str] = []
    all_keys = sorted({k for g in groups for k in g.settings})
    for k in all_keys:
        if k in ("opt", "mask"):
            continue
        # A key varies when groups that have it disagree (SAM-only keys are absent for SGD, etc.).
        if len({repr(g.settings[k]) for g in groups if k in g.settings}) > 1:
            varying.append(k)
    rows: list[dict[str, Any]] = []
    for g in groups:
        nums = [run_numbers(r) for r in g.runs]
        final_m, final_s = _mean_std([n["final"] for n in nums])
        best_m, best_s = _mean_std([n["best"] for n in nums])
        times = [n["epoch_time"] for n in nums if n["epoch_time"] is not None]
        computes = [n["compute"] for n in nums if n["compute"] is not None]
        row = {
            "method": g.label,
            "settings": {k: g.settings.get(k) for k in varying},
            "seeds": len(g.runs),
            "final_mean": final_m,
            "final_std": final_s,
            "best_mean": best_m,
            "best_std": best_s,
            "epochs_done": min(n["epochs_done"] for n in nums),
            "epochs": g.settings.get("epochs"),
            "finished": all(r.finished for r in g.runs),
            "epoch_time_s": statistics.fmean(times) if times else None,
            "compute": statistics.fmean(computes) if len(computes) == len(nums) else None,
            "group": g,
        }
        rows.append(row)
    for row in rows:
        ref = _sgd_reference(row["group"], [r["group"] for r in rows])
        ref_row = next((r for r in rows if r["group"] is ref), None)
        if ref_row and ref_row["epoch_time_s"] and row["epoch_time_s"] is not None:
            row["time_ratio"] = row["epoch_time_s"] / ref_row["epoch_time_s"]
        else:
            row["time_ratio"] = None
        # Compute per epoch relative to SGD's (counted passes, not timed: comparable on a noisy machine).
        row["compute_ratio"] = None
        if (
            ref_row
            and ref_row["compute"]
            and row["compute"] is not None
            and row["epochs_done"]
            and ref_row["epochs_done"]
        ):
            row["compute_ratio"] = (row["compute"] / row["epochs_done"]) / (ref_row["compute"] / ref_row["epochs_done"])
        # Time to SGD's accuracy: training time (evaluation excluded) until the first evaluation at
        # or above the SGD reference's mean final accuracy; mean over the runs that got there.
        row["to_sgd_s"], row["to_sgd_runs"] = None, 0
        row["sgd_target"] = ref_row["final_mean"] if ref_row else None
        if row["sgd_target"] is not None:
            reached = [
                t for t in (time_to_accuracy(r.metrics, row["sgd_target"]) for r in row["group"].runs) if t is not None
            ]
            row["to_sgd_runs"] = len(reached)
            row["to_sgd_s"] = statistics.fmean(reached) if reached else None
    return [k for k in varying if k != "sparsity"], rows


def time_to_accuracy(metrics: Sequence[dict[str, Any]], target: float) -> float | None:
    """Cumulative training time (``time_s``: evaluation excluded) at the first epoch whose test
    accuracy is at least ``target``; ``None`` if no epoch reached it."""
    for r in metrics:
        if r.get("test_acc") is not None and r["test_acc"] >= target:
            return float(r["time_s"])
    return None


def _sgd_reference(g: Group, groups: list[Group]) -> Group | None:
    for other in groups:
        if other.settings.get("opt") == "sgd" and all(other.settings.get(k) == g.settings.get(k) for k in _TIME_KEYS):
            return other
    return None


def paired_difference(a: Group, b: Group) -> list[float]:
    """Final test accuracy of ``a`` minus that of ``b`` (fractions), one value per seed both groups
    ran, in seed order; runs without a final test accuracy are left out."""

    def finals(g: Group) -> dict[Any, float]:
        out = {}
        for run in g.runs:
            final = run_numbers(run)["final"]
            if final is not None:
                out[run.config.get("seed")] = float(final)
        return out

    fa, fb = finals(a), finals(b)
    return [fa[s] - fb[s] for s in sorted(set(fa) & set(fb), key=str)]


def _pct(mean: float | None, std: float | None, *, pm: str = " ± ") -> str:
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + (f"{pm}{100 * std:.2f}" if std is not None else "")


def sig3(value: float) -> str:
    """``value`` to three significant digits, trailing zeros kept (``0.250``, ``12.0``, ``1234``)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    text = f"{value:#.3g}"
    return text[:-1] if text.endswith(".") else text


#: the columns of ``to_markdown`` / ``to_latex`` after Method, Sparsity and the varying settings
COLUMNS: tuple[str, ...] = (
    "Seeds",
    "Final acc (%)",
    "Best acc (%)",
    "Epochs",
    "Time/epoch (s)",
    "vs SGD",
    "To SGD acc (s)",
    "Compute (SGD steps)",
    "Compute vs SGD",
)


def _table(
    varying: list[str], rows: list[dict[str, Any]], columns: Sequence[str] | None, pm: str = " ± "
) -> tuple[list[str], list[list[str]]]:
    """(header, cells of each row) of the report table, with the chosen ``columns`` (default all)."""
    if columns is not None:
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown table columns {unknown}; known: {', '.join(COLUMNS)}")
    keep = [c for c in COLUMNS if columns is None or c in columns]
    head = ["Method", "Sparsity", *varying, *keep]
    body = []
    for r in rows:
        g: Group = r["group"]
        sparsity: Any = "—"
        if is_sparse(g.settings):
            sparsity = g.settings.get("nm") if g.settings.get("pattern") == "nm" else f"{g.settings.get('sparsity'):g}"
        epochs = f"{r['epochs_done']}/{r['epochs']}" + ("" if r["finished"] else " (running)")
        cells = {
            "Seeds": str(r["seeds"]),
            "Final acc (%)": _pct(r["final_mean"], r["final_std"], pm=pm),
            "Best acc (%)": _pct(r["best_mean"], r["best_std"], pm=pm),
            "Epochs": epochs,
            "Time/epoch (s)": "—" if r["epoch_time_s"] is None else sig3(r["epoch_time_s"]),
            "vs SGD": "—" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}x",
            "To SGD acc (s)": _to_sgd(r),
            "Compute (SGD steps)": "—" if r["compute"] is None else f"{r['compute']:.0f}",
            "Compute vs SGD": "—" if r["compute_ratio"] is None else f"{r['compute_ratio']:.2f}x",
        }
        body.append(
            [
                r["method"],
                str(sparsity),
                *["—" if k not in g.settings else str(g.settings[k]) for k in varying],
                *[cells[c] for c in keep],
            ]
        )
    return head, body


def to_markdown(varying: list[str], rows: list[dict[str, Any]], *, columns: Sequence[str] | None = None) -> str:
    """The report table in Markdown; ``columns``: which of ``COLUMNS`` to show (default all)."""
    head, body = _table(varying, rows, columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_"}
_LATEX_ESCAPES.update({"{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"})


def _latex(text: str) -> str:
    out = "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)
    return out.replace("—", "--").replace("ρ", r"$\rho$")


def to_latex(
    varying: list[str], rows: list[dict[str, Any]], *, columns: Sequence[str] | None = None, caption: str | None = None
) -> str:
    """The report table as a LaTeX ``table`` with booktabs rules (``\\usepackage{booktabs}``): the
    same columns and numbers as ``to_markdown``, ``±`` as ``$\\pm$``, text escaped."""
    head, body = _table(varying, rows, columns, pm=" \x00 ")
    align = "l" * (2 + len(varying)) + "r" * (len(head) - 2 - len(varying))
    lines = [r"\begin{table}[t]", r"\centering"]
    if caption:
        lines.append(r"\caption{" + _latex(caption) + "}")
    lines += [r"\begin{tabular}{" + align + "}", r"\toprule"]
    lines.append(" & ".join(_latex(h) for h in head) + r" \\")
    lines.append(r"\midrule")
    for cells in body:
        lines.append(" & ".join(_latex(c).replace(" \x00 ", r" $\pm$ ") for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _to_sgd(r: dict[str, Any]) -> str:
    if r.get("sgd_target") is None:
        return "—"  # no SGD run with the same data, model and batch settings
    if r["to_sgd_s"] is None:
        return "not reached"
    n = f" ({r['to_sgd_runs']}/{r['seeds']})" if r["to_sgd_runs"] != r["seeds"] else ""
    return f"{sig3(r['to_sgd_s'])}{n}"


def to_csv(varying: list[str], rows: list[dict[str, Any]]) -> str:
    """The report table as CSV, numbers at full precision: accuracy in percent (``*_pct``), times in
    seconds, ratios as plain numbers."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(
        [
            "method",
            "opt",
            "mask",
            "sparsity",
            *varying,
            "seeds",
            "final_acc_mean_pct",
            "final_acc_std_pct",
            "best_acc_mean_pct",
            "best_acc_std_pct",
            "epochs_done",
            "epochs",
            "finished",
            "epoch_time_s",
            "time_ratio_vs_sgd",
            "time_to_sgd_acc_s",
            "runs_reaching_sgd_acc",
            "runs",
            "compute_sgd_steps",
            "compute_ratio_vs_sgd",
        ]
    )
    for r in rows:
        g: Group = r["group"]
        spec = OPTIMIZERS.get(g.settings.get("opt", ""))
        ssam = spec is not None and spec.uses_mask
        w.writerow(
            [
                r["method"],
                g.settings.get("opt"),
                g.settings.get("mask", "") if ssam else "",
                g.settings.get("sparsity", "") if ssam else "",
                *[r["settings"].get(k) for k in varying],
                r["seeds"],
                *(None if r[k] is None else 100 * r[k] for k in ("final_mean", "final_std", "best_mean", "best_std")),
                r["epochs_done"],
                r["epochs"],
                r["finished"],
                r["epoch_time_s"],
                r["time_ratio"],
                r["to_sgd_s"],
                r["to_sgd_runs"],
                ";".join(str(run.path) for run in g.runs),
                r["compute"],
                r["compute_ratio"],
            ]
        )
    return buf.getvalue()


def curves(group: Group) -> dict[str, list[float]]:
    """Mean (and std) test accuracy per epoch over a group's seeds, with the mean cumulative
    training time; only epochs every seed has reached."""
    n = min((len(r.metrics) for r in group.runs), default=0)
    out: dict[str, list[float]] = {"epoch": [], "acc_mean": [], "acc_std": [], "time_s": [], "compute": []}
    for i in range(n):
        accs = [r.metrics[i]["test_acc"] for r in group.runs]
        if any(a is None for a in accs):
            continue  # an epoch not evaluated on the test set (--test-epochs)
        out["epoch"].append(group.runs[0].metrics[i]["epoch"])
        out["acc_mean"].append(statistics.fmean(accs))
        out["acc_std"].append(statistics.stdev(accs) if len(accs) > 1 else 0.0)
        out["time_s"].append(statistics.fmean(r.metrics[i]["time_s"] for r in group.runs))
        computes = [float(c) for c in (r.metrics[i].get("compute") for r in group.runs) if c is not None]
        if len(computes) == len(group.runs):  # SGD-step equivalents (runs recorded before the counter: none)
            out["compute"].append(statistics.fmean(computes))
    return out


__all__ = [
    "COLUMNS",
    "Group",
    "curves",
    "group_runs",
    "paired_difference",
    "run_numbers",
    "sig3",
    "summarize",
    "to_csv",
    "to_latex",
    "to_markdown",
]
