"""Figures for the analysis results. Plotting only: every function takes numbers already computed
(plain dicts and lists, as returned by ``sparsam.analysis``) and writes files.

matplotlib is imported lazily, inside each function, and used through its object-oriented API
with the Agg canvas (``matplotlib.figure.Figure``; ``pyplot`` is never imported), so calling these
functions neither needs a display nor changes the caller's matplotlib backend or global state.

Every function writes ``<path>.png`` and ``<path>.pdf`` (``formats``; a ``.png``/``.pdf`` suffix on
``path`` is dropped) and returns the written paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "plot_landscape_1d",
    "plot_landscape_2d",
    "plot_mask_density",
    "plot_spectra",
    "plot_training_curves",
]

Formats = Sequence[str]
_DEFAULT_FORMATS = ("png", "pdf")


def _figure(ncols: int = 1, width: float = 5.5, height: float = 4.0) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Any, path: str | Path, formats: Formats) -> list[Path]:
    stem = Path(path)
    if stem.suffix.lower() in (".png", ".pdf", ".svg"):
        stem = stem.with_suffix("")
    if not formats:
        raise ValueError("formats is empty: give at least one of 'png', 'pdf', 'svg'")
    stem.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        fmt = fmt.lower().lstrip(".")
        if fmt not in ("png", "pdf", "svg"):
            raise ValueError(f"formats must contain 'png', 'pdf' or 'svg', got {fmt!r}")
        out = stem.with_suffix(f".{fmt}")
        fig.savefig(out, dpi=150 if fmt == "png" else None)
        written.append(out)
    return written


def _runs(obj: Mapping[str, Any], single_key: str) -> Mapping[str, Any]:
    """Accept either one result (a mapping with ``single_key``) or {run name: result}."""
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"expected a non-empty dict of results, got {obj!r}")
    return {"": obj} if single_key in obj else obj


# Colours of runs whose method is not known: distinct, none grey or black (SGD's and SAM's colours in
# ``sparsam.runs.figures.method_style``); beyond these, evenly spaced hues.
_RUN_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#aec7e8",
    "#ffbb78",
    "#98df8a",
    "#ff9896",
    "#c5b0d5",
)


def _run_styles(names: Sequence[str], styles: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Line style and label of each run: from ``styles[name]`` (any object with ``color`` and
    ``label``, and optionally ``linestyle`` and ``marker``: a ``sparsam.runs.figures.MethodStyle``),
    else a colour no other run of the figure has, and the run's name."""
    import colorsys

    styles = styles or {}
    taken = {str(styles[n].color) for n in names if n in styles}
    free = [c for c in _RUN_COLORS if c not in taken]
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        s = styles.get(name)
        if s is not None:
            out[name] = {
                "color": s.color,
                "label": s.label,
                "linestyle": getattr(s, "linestyle", "-"),
                "marker": getattr(s, "marker", "o"),
            }
            continue
        if free:
            color = free.pop(0)
        else:
            r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, 0.45 if i % 2 else 0.6, 0.7)
            color = f"#{round(255 * r):02x}{round(255 * g):02x}{round(255 * b):02x}"
        out[name] = {"color": color, "label": name or None, "linestyle": "-", "marker": "o"}
    return out


def _legend_right(ax: Any, title: str | None = None) -> None:
    """The legend beside the axes, outside the data."""
    ax.legend(title=title, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)


def plot_landscape_1d(
    runs: Mapping[str, Mapping[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str = "Loss along a random filter-normalised direction",
    xlabel: str = r"step $\alpha$ along the direction ($w + \alpha d$)",
    ylabel: str = "mean loss",
    log: bool = False,
    formats: Formats = _DEFAULT_FORMATS,
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """1-D loss curves of several runs on one axis, the legend beside it.

    Args:
        runs: ``{run name: {"alphas": [...], "losses": [...]}}`` (or one such dict).
        log: logarithmic loss axis.
        styles: ``{run name: style}``, a style being any object with ``color`` and ``label``
            (``sparsam.runs.figures.method_style`` of the run's configuration gives the project's
            colour and words for its method); runs without one get a colour no other run has.
    """
    results = _runs(runs, "alphas")
    fig, (ax,) = _figure(width=7.0 if any(results) else 5.5)
    look = _run_styles(list(results), styles)
    for name, res in results.items():
        ax.plot(res["alphas"], res["losses"], markersize=2.5, **look[name])
    ax.axvline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(results):
        _legend_right(ax, "run")
    return _save(fig, path, formats)


def plot_landscape_2d(
    runs: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "Loss on a plane of two random filter-normalised directions",
    levels: int = 30,
    formats: Formats = _DEFAULT_FORMATS,
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Contour plots of 2-D landscapes, one panel per run, sharing one colour scale.

    Args:
        runs: ``{run name: {"alphas": [...], "betas": [...], "losses": [[...]]}}`` (or one such
            dict), with ``losses[i][j]`` at ``(alphas[i], betas[j])``.
        levels: number of contour levels.
        styles: ``{run name: style}`` as for ``plot_landscape_1d``: a panel's title is its run's label.
    """
    import numpy as np

    results = _runs(runs, "losses")
    fig, axes = _figure(len(results), width=4.8, height=4.2)
    all_losses = np.concatenate([np.asarray(r["losses"], dtype=float).ravel() for r in results.values()])
    finite = all_losses[np.isfinite(all_losses)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    bounds = np.linspace(lo, hi, levels)
    mappable = None
    for ax, (name, res) in zip(axes, results.items()):
        a = np.asarray(res["alphas"], dtype=float)
        b = np.asarray(res["betas"], dtype=float)
        z = np.asarray(res["losses"], dtype=float)
        if z.shape != (a.size, b.size):
            raise ValueError(
                f"run {name!r}: losses has shape {z.shape}, expected (len(alphas), len(betas)) = {(a.size, b.size)}"
            )
        A, B = np.meshgrid(a, b, indexing="ij")
        mappable = ax.contourf(A, B, z, levels=bounds, cmap="viridis", extend="both")
        ax.contour(A, B, z, levels=bounds[::3], colors="white", linewidths=0.5, alpha=0.6)
        ax.plot([0], [0], marker="*", color="red", markersize=10, label="trained weights $w$")
        ax.set(
            xlabel=r"$\alpha$ (direction $d_1$)",
            ylabel=r"$\beta$ (direction $d_2$)",
            title=(styles[name].label if styles and name in styles else name) or title,
        )
        ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="upper right", fontsize="small")
    if mappable is not None:
        fig.colorbar(mappable, ax=axes, format="%.3g", label=r"mean loss $L(w + \alpha d_1 + \beta d_2)$")
    if len(results) > 1 or next(iter(results)):
        fig.suptitle(title)
    return _save(fig, path, formats)


def _density_arrays(sd: Any) -> tuple[Any, Any] | None:
    if sd is None:
        return None
    if hasattr(sd, "grid") and hasattr(sd, "density"):
        return sd.grid, sd.density
    if isinstance(sd, Mapping) and "grid" in sd and "density" in sd:
        return sd["grid"], sd["density"]
    raise ValueError("a spectral density must be a SpectralDensity or a dict with 'grid' and 'density'")


def plot_spectra(
    runs: Mapping[str, Mapping[str, Any]],
    path: str | Path,
    *,
    title: str = "Hessian spectra",
    formats: Formats = _DEFAULT_FORMATS,
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Eigenvalue spectra of several runs side by side.

    Left: the top eigenvalues of each run (one column per run, the largest marked). Right (when any
    run has one): the spectral densities on a log scale. The Hessian trace, when given, is shown in
    the legend.

    Args:
        runs: ``{run name: {"top_eigenvalues": [...], "spectral_density": SpectralDensity or
            {"grid", "density"}, "trace": float}}``, every key optional.
        styles: ``{run name: style}`` as for ``plot_landscape_1d``: each run's colour and words.
    """
    import numpy as np

    results = dict(runs)
    if not results:
        raise ValueError("runs is empty: nothing to plot")
    has_density = any(_density_arrays(r.get("spectral_density")) is not None for r in results.values())
    fig, axes = _figure(2 if has_density else 1)
    ax = axes[0]
    names = list(results)
    look = _run_styles(names, styles)
    labels = [look[n]["label"] or n for n in names]
    for i, name in enumerate(names):
        eig = [float(e) for e in results[name].get("top_eigenvalues", [])]
        if not eig:
            continue
        label = labels[i]
        if results[name].get("trace") is not None:
            label = f"{label} (trace {float(results[name]['trace']):.3g})"
        ax.scatter([i] * len(eig), eig, s=25, alpha=0.8, label=label, color=look[name]["color"])
        ax.scatter([i], [max(eig)], s=90, marker="_", color="0.3")
    ax.axhline(0.0, color="0.6", linewidth=0.8)
    ax.set_xticks(range(len(names)), labels, rotation=20 if len(names) > 3 else 0)
    ax.set(title="Top Hessian eigenvalues", xlabel="run", ylabel=r"eigenvalue $\lambda$")
    ax.grid(alpha=0.3, axis="y")
    _legend_right(ax)
    if has_density:
        ax = axes[1]
        for name in names:
            arr = _density_arrays(results[name].get("spectral_density"))
            if arr is None:
                continue
            grid, density = np.asarray(arr[0], dtype=float), np.asarray(arr[1], dtype=float)
            ax.plot(grid, np.maximum(density, 1e-12), label=look[name]["label"] or name, color=look[name]["color"])
        ax.set_yscale("log")
        ax.set(
            title="Spectral density (stochastic Lanczos quadrature)",
            xlabel=r"eigenvalue $\lambda$",
            ylabel="density (log scale)",
        )
        ax.grid(alpha=0.3)
        _legend_right(ax)
    fig.suptitle(title)
    return _save(fig, path, formats)


def plot_mask_density(
    runs: Mapping[str, Any],
    path: str | Path,
    *,
    title: str = "Mask density per layer (fraction of coordinates perturbed)",
    formats: Formats = _DEFAULT_FORMATS,
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Horizontal bars of the mask density of each layer, in depth order (first layer on top),
    grouped by run.

    Args:
        runs: ``{run name: {layer: density}}`` or one ``{layer: density}`` dict.
        styles: ``{run name: style}`` as for ``plot_landscape_1d``: each run's colour and words.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"expected a non-empty dict of densities, got {runs!r}")
    first = next(iter(runs.values()))
    single = not isinstance(first, Mapping)
    results: Mapping[str, Mapping[str, float]] = {"": runs} if single else runs
    layers: list[str] = []
    for dens in results.values():
        layers += [name for name in dens if name not in layers]
    n_runs = len(results)
    fig, (ax,) = _figure(width=7.0, height=max(3.0, 0.28 * len(layers) * max(1, n_runs) ** 0.5 + 1.5))
    height = 0.8 / n_runs
    look = _run_styles(list(results), styles)
    for r, (name, dens) in enumerate(results.items()):
        ys = [i + (r - (n_runs - 1) / 2) * height for i in range(len(layers))]
        values = [float(dens.get(layer, math.nan)) for layer in layers]
        ax.barh(ys, values, height=height, label=look[name]["label"], color=look[name]["color"])
    ax.set_yticks(range(len(layers)), layers, fontsize="small" if len(layers) > 15 else None)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set(title=title, xlabel="density (1 - sparsity)", ylabel="layer (input to output)")
    ax.grid(alpha=0.3, axis="x")
    if n_runs > 1 or next(iter(results)):
        _legend_right(ax, "run")
    return _save(fig, path, formats)


_CURVE_LABELS = {
    "train_loss": ("Training loss", "loss"),
    "test_loss": ("Test loss", "loss"),
    "train_acc": ("Training accuracy", "accuracy (%)"),
    "test_acc": ("Test accuracy", "accuracy (%)"),
}
_PERCENT = frozenset({"train_acc", "test_acc"})  # stored as fractions, drawn in percent as in the report


def plot_training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    keys: Sequence[str] | None = None,
    title: str = "Training curves",
    formats: Formats = _DEFAULT_FORMATS,
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Per-epoch metrics of several runs, one panel per metric, one legend beside the panels.

    Args:
        runs: ``{run name: [{"epoch": 1, "train_loss": ..., "test_acc": ...}, ...]}``.
        keys: the metrics to plot (default: those of ``train_loss``, ``test_loss``, ``train_acc``,
            ``test_acc`` present in some run, in that order).
        styles: ``{run name: style}`` as for ``plot_landscape_1d``.
    """
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(f"runs must be a non-empty dict run name -> list of per-epoch dicts, got {runs!r}")
    present = {k for rows in runs.values() for row in rows for k in row}
    if keys is None:
        keys = [k for k in _CURVE_LABELS if k in present]
    if not keys:
        raise ValueError(f"no metric to plot: the per-epoch dicts have keys {sorted(present)}")
    from matplotlib.ticker import MaxNLocator

    look = _run_styles(list(runs), styles)
    fig, axes = _figure(len(keys), width=4.5)
    for ax, key in zip(axes, keys):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, rows in runs.items():
            pts = [(row.get("epoch", i + 1), row[key]) for i, row in enumerate(rows) if row.get(key) is not None]
            scale = 100.0 if key in _PERCENT else 1.0
            if pts:
                ax.plot([p[0] for p in pts], [scale * float(p[1]) for p in pts], markersize=2.5, **look[name])
        ttl, ylabel = _CURVE_LABELS.get(key, (key, key))
        ax.set(title=ttl, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
    handles: dict[str, Any] = {}
    for ax in axes:  # one entry per run, from whichever panel drew it
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        axes[-1].legend(
            list(handles.values()),
            list(handles),
            loc="upper left",
            bbox_to_anchor=(1.02, 1.0),
            fontsize="small",
            frameon=False,
        )
    fig.suptitle(title)
    return _save(fig, path, formats)
