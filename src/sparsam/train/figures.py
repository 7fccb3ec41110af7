"""Plots of test accuracy against epochs and against training time (matplotlib, imported lazily)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from .methods import is_sparse
from .tables import Group, curves


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        from .errors import UserError

        raise UserError(
            "plots need matplotlib (pip install matplotlib, or sparsam[cli]); pass --no-plots to skip them"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(g: Group, varying: Sequence[str]) -> str:
    parts = [g.label]
    if is_sparse(g.settings):
        parts.append(f"s={g.settings.get('sparsity'):g}")
    parts += [f"{k}={g.settings[k]}" for k in varying if k not in ("data", "model", "sparsity") and k in g.settings]
    return " ".join(parts)


def plot_accuracy(
    groups: Sequence[Group],
    path: str | os.PathLike[str],
    *,
    x: str,
    varying: Sequence[str] = (),
    title: str | None = None,
) -> None:
    """One line per group: mean test accuracy (%) over seeds, a band of ± one std when there are
    several seeds. ``x="epoch"``, ``x="time"`` (cumulative training time, s) or ``x="compute"``
    (training compute in SGD-step equivalents, counted by the optimizer; groups whose runs did
    not record it are left out). One panel per (data, model) pair."""
    plt = _pyplot()
    panels: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        data = str(g.settings.get("data"))
        panels.setdefault((os.path.basename(data) or data, str(g.settings.get("model"))), []).append(g)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, ((data, model), members) in zip(axes[0], panels.items()):
        for g in members:
            c = curves(g)
            if not c["epoch"] or (x == "compute" and len(c["compute"]) != len(c["epoch"])):
                continue
            xs = {"epoch": c["epoch"], "time": c["time_s"], "compute": c["compute"]}[x]
            mean = [100 * v for v in c["acc_mean"]]
            (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=_label(g, varying))
            if len(g.runs) > 1:
                lo = [100 * (m - s) for m, s in zip(c["acc_mean"], c["acc_std"])]
                hi = [100 * (m + s) for m, s in zip(c["acc_mean"], c["acc_std"])]
                ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
        ax.set_xlabel(
            {"epoch": "epoch", "time": "training time (s)", "compute": "training compute (SGD-step equivalents)"}[x]
        )
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(title or f"{data}, {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
