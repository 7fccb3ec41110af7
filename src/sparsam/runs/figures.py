"""Plots of test accuracy against epochs and against training time (matplotlib, imported lazily),
and the project's fixed colours and words for every method (``method_style``: each method's
style is declared with it in the registry, ``sparsam.train.methods``).

Every figure of the project draws a method in the same colour: SGD grey, SAM black (ASAM a dark
grey), SSAM-F blues and SSAM-D oranges with the sparsity as lightness (50% dark, 99% light),
the other masks (SSAM-R, norm layers only) raspberry and magenta, the cheaper SAM variants greens
(every-k, late-phase, sub-batch ascent), purples (LookSAM, LookSSAM), teal (ESAM) and gold-olive (MSAM, sparse MSAM).
"""

from __future__ import annotations

import colorsys
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..train import methods
from ..train.config import IDENTITY_KEYS
from ..train.methods import FAMILIES, MethodStyle, relevant
from ..train.methods._spec import hex_color as _hex
from .tables import Group, curves


def _num(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _identity(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The identity settings that matter for the method (a config.json dict, a TrainConfig dict or a
    report group's settings)."""
    if isinstance(settings.get("config"), Mapping):  # a whole config.json
        settings = settings["config"]
    s = {k: settings[k] for k in IDENTITY_KEYS if k in settings}
    for k in ("opt", "mask"):  # keep them even when someone passes a partial dict
        if k in settings:
            s[k] = settings[k]
    return {k: v for k, v in s.items() if k in ("opt", "mask") or relevant(k, s)}


def method_style(settings: Mapping[str, Any]) -> MethodStyle:
    """The colour, label and family of a run's method, the same in every figure.

    Args:
        settings: the run's configuration: the ``config.json`` dict (with or without its
            ``"config"`` wrapper), ``TrainConfig.to_dict()`` or a report group's settings. Keys
            read: ``opt``, ``mask``, ``sparsity``, ``pattern``, ``nm``, ``adaptive``, ``sam_every``,
            ``sam_start``, ``rho_ramp``, ``ascent_fraction``, ``look_k``.

    Returns:
        A ``MethodStyle``. The label names the method only;
        settings that tell two runs of one method apart (epochs, weight decay) are added by
        ``method_styles``, which also keeps colours from
        repeating within one figure.

    ```python
    from sparsam.runs.figures import method_style

    style = method_style({"opt": "ssam", "mask": "fisher", "sparsity": 0.5})
    assert style.label == "SSAM-F, 50%" and style.family == "SSAM-F"
    assert method_style({"opt": "sgd"}).label == "SGD"
    ```
    """
    return methods.method_style(_identity(settings))


# Settings that are part of the method's label, or that a figure shows otherwise (rows, seeds).
_IN_LABEL = frozenset(
    {
        "opt",
        "mask",
        "sparsity",
        "pattern",
        "nm",
        "adaptive",
        "sam_every",
        "sam_start",
        "rho_ramp",
        "ascent_fraction",
        "look_k",
        "seed",
        "data",
        "model",
    }
)
_WORDS = {
    "weight_decay": "wd",
    "batch_size": "batch",
    "lr": "lr",
    "rho": "ρ",
    "train_subset": "train subset",
    "look_alpha": "α",
    "esam_beta": "β",
    "esam_gamma": "γ",
}


def _setting_words(key: str, value: Any) -> str:
    if key == "epochs":
        return f"{value} epochs"
    if isinstance(value, float):
        value = f"{value:g}"
    elif isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    return f"{_WORDS.get(key, key.replace('_', ' '))} {value}"


def _shades(color: str) -> list[str]:
    """Other shades of ``color``, nearest first (to keep a figure free of repeated colours)."""
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    h, light, sat = colorsys.rgb_to_hls(r, g, b)
    out = []
    for d in (0.16, -0.12, 0.3, -0.22, 0.42, 0.08, -0.06, 0.22, 0.36):
        lo = light + d
        if 0.05 <= lo <= 0.85:
            out.append(_hex(360 * h, lo, sat))
    return out


def _most_common(values: Sequence[str]) -> str | None:
    counts = Counter(values).most_common(2)
    return counts[0][0] if counts and (len(counts) == 1 or counts[0][1] > counts[1][1]) else None


def method_styles(settings: Sequence[Mapping[str, Any]], *, keys: Sequence[str] | None = None) -> list[MethodStyle]:
    """The styles of the methods of one figure: ``method_style``
    of each, with labels and colours that tell them apart.

    Runs of one method that differ in a setting outside the method (``epochs``, ``weight_decay``,
    ...) have it named, in words, where their value is not the most common one (``"SGD"`` and
    ``"SGD, 40 epochs"``); a setting that differs only between methods (the SSAM paper's weight
    decay for SGD and for SAM) is the report table's business, not the legend's. A colour already
    used in the figure is replaced by another shade of the same hue (and a dashed line).

    Args:
        settings: one configuration per line of the figure (see ``method_style``).
        keys: the settings that may be named in the labels (default: any).
    """
    ids = [_identity(s) for s in settings]
    styles = [method_style(s) for s in ids]
    candidates = sorted({k for s in ids for k in s} - _IN_LABEL)
    if keys is not None:
        candidates = [k for k in candidates if k in keys]
    extra: list[list[str]] = [[] for _ in ids]
    by_label: dict[str, list[int]] = {}
    for i, style in enumerate(styles):
        by_label.setdefault(style.label, []).append(i)
    for k in candidates:
        everywhere = _most_common([repr(s[k]) for s in ids if k in s])
        for same in by_label.values():
            values = [repr(ids[i].get(k)) for i in same]
            if len(set(values)) < 2:
                continue
            common = _most_common(values) or everywhere  # a tie within the method: the figure's most common
            for i in same:
                if k in ids[i] and repr(ids[i][k]) != common:
                    extra[i].append(_setting_words(k, ids[i][k]))
    out: list[MethodStyle] = []
    used: set[str] = set()
    for style, more in zip(styles, extra):
        label = ", ".join([style.label, *more])
        color, linestyle = style.color, style.linestyle
        if color in used:
            color = next((c for c in _shades(color) if c not in used), color)
            linestyle = "--" if style.linestyle == "-" else ":"
        used.add(color)
        out.append(replace(style, label=label, color=color, linestyle=linestyle))
    return out


def _figure(nrows: int, ncols: int, width: float, height: float) -> tuple[Any, Any]:
    """A matplotlib Figure on the Agg canvas (pyplot is not used: no global state, no display) and
    its grid of axes."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        from ..train.errors import UserError

        raise UserError(
            "plots need matplotlib (pip install matplotlib, or sparsam[cli]); pass --no-plots to skip them"
        ) from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


_PANEL_TITLES = {
    "SSAM-F": "SSAM-F (Fisher mask)",
    "SSAM-D": "SSAM-D (dynamic mask)",
    "other SSAM": "other masks",
    "cheaper SAM": "cheaper SAM variants",
    "other": "other methods",
}
_X = {
    "epoch": ("epoch", "epoch"),
    "time": ("training time", "training time (s, evaluation excluded)"),
    "compute": ("training compute", "training compute (SGD-step equivalents)"),
}

Line = tuple[Group, MethodStyle, dict[str, list[float]]]


def _chunks(items: list[Line], cap: int) -> list[list[Line]]:
    """``items`` in as few near-equal runs of at most ``cap`` as possible."""
    n = max(1, math.ceil(len(items) / cap))
    sizes = [len(items) // n + (1 if j < len(items) % n else 0) for j in range(n)]
    out, start = [], 0
    for size in sizes:
        out.append(items[start : start + size])
        start += size
    return out


def _panels(lines: list[Line], max_lines: int) -> list[tuple[str, list[Line]]]:
    """(title, lines) of each panel of one row: one panel per family present, the references
    (SGD, SAM) in every one; a family with more lines than fit is split (SSAM masks: unstructured
    by sparsity, then the other patterns). Lines that all fit in one panel share one."""
    refs = [ln for ln in lines if ln[1].reference]
    families: dict[str, list[Line]] = {}
    for ln in lines:
        if not ln[1].reference:
            families.setdefault(ln[1].family, []).append(ln)
    order = sorted(families, key=lambda f: FAMILIES.index(f) if f in FAMILIES else len(FAMILIES))
    if not families:
        return [("SGD and SAM" if refs else "", refs)]
    if len(lines) <= max_lines:
        title = _PANEL_TITLES.get(order[0], order[0]) if len(order) == 1 else ""
        return [(title, refs + [ln for f in order for ln in families[f]])]
    cap = max(2, max_lines - len(refs))
    out: list[tuple[str, list[Line]]] = []
    for family in order:
        members = families[family]
        name = _PANEL_TITLES.get(family, family)
        if family in ("SSAM-F", "SSAM-D", "other SSAM"):
            members.sort(
                key=lambda ln: (
                    _patterned(ln),
                    ln[0].settings.get("mask") == "norm",
                    _num(ln[0].settings.get("sparsity"), 0.0),
                )
            )
            plain = [ln for ln in members if not _patterned(ln)]
            patterned = [ln for ln in members if _patterned(ln)]
            if len(members) > cap and plain and patterned:
                out += _numbered(f"{name}, unstructured", refs, _chunks(plain, cap))
                out += _numbered(f"{name}, other patterns", refs, _chunks(patterned, cap))
                continue
        out += _numbered(name, refs, _chunks(members, cap))
    return out


def _patterned(line: Line) -> bool:
    return line[0].settings.get("pattern", "unstructured") != "unstructured"


def _numbered(name: str, refs: list[Line], chunks: list[list[Line]]) -> list[tuple[str, list[Line]]]:
    """(title, the references + the chunk) of each chunk; titles numbered when there are several."""
    return [(name + (f" ({j + 1}/{len(chunks)})" if len(chunks) > 1 else ""), refs + c) for j, c in enumerate(chunks)]


def _seeds_note(plotted: list[Line]) -> tuple[str, bool]:
    """(the caption's words on seeds, whether each label must give its number of seeds)."""
    counts = {len(g.runs) for g, _, _ in plotted}
    if not counts:
        return "", False
    if len(counts) == 1:
        n = counts.pop()
        return (f"mean ± std over {n} seeds (line ± band)" if n > 1 else "one seed per line"), False
    return "mean over the seeds given in the legend; band: ± one std", True


def plot_accuracy(
    groups: Sequence[Group],
    path: str | os.PathLike[str],
    *,
    x: str,
    varying: Sequence[str] = (),
    title: str | None = None,
    max_lines: int = 6,
    max_cols: int = 3,
    formats: Sequence[str] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Any:
    """Test accuracy against epochs, training time or training compute, as small multiples.

    The panels of each (data, model) pair share their axes and start a new row (wrapping after
    ``max_cols``): one panel per method family present (SSAM-F, SSAM-D, other masks, cheaper SAM
    variants), with SGD and SAM drawn in every panel as the references, at most ``max_lines``
    lines a panel (a larger family is split over several panels; when every line fits in one
    panel, they share it). Each line is a group's mean test accuracy (%) over its seeds,
    with a band of ± one std when it has several; colours and labels are the project's
    (``method_style``); the legends lie below the panels and the title states the number of seeds.

    Args:
        groups: report groups (``sparsam.runs.tables.group_runs``).
        path: the PNG to write.
        x: ``"epoch"``, ``"time"`` (cumulative training time in s, evaluation excluded) or
            ``"compute"`` (training compute in SGD-step equivalents, counted by the optimizer;
            groups whose runs did not record it are left out, and the title says how many).
        varying: settings that may be named in the labels when runs of one method differ in them
            (default: any).
        title: the figure's title (default: what is plotted, and the data and model).
        max_lines: the most lines in a panel.
        max_cols: the most panels side by side (more wrap onto further rows).
        formats: write the figure in each of these formats (``"png"``, ``"pdf"``, ``"svg"``),
            ``path`` with its suffix replaced (default: ``path`` as given).
        ylim: the test-accuracy axis's limits in % (default: matplotlib's, to fit every line).

    Returns:
        The matplotlib Figure (already written to ``path``, or to each format).
    """
    targets = _targets(path, formats)
    if x not in _X:
        raise ValueError(f"x must be 'epoch', 'time' or 'compute', got {x!r}")
    if max_cols < 1:
        raise ValueError(f"max_cols must be at least 1, got {max_cols}")
    if max_lines < 3:
        raise ValueError(f"max_lines must be at least 3 (two references and one method), got {max_lines}")
    pairs: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        data = str(g.settings.get("data"))
        pairs.setdefault((os.path.basename(data.rstrip("/")) or data, str(g.settings.get("model"))), []).append(g)
    rows: dict[tuple[str, str], list[Line]] = {}
    left_out = 0
    for key, members in pairs.items():
        # styles per (data, model) pair: a method keeps its colour in every row, and no row repeats one
        rows[key] = []
        for g, style in zip(members, method_styles([g.settings for g in members], keys=list(varying) or None)):
            c = curves(g)
            if not c["epoch"]:
                continue
            if x == "compute" and len(c["compute"]) != len(c["epoch"]):
                left_out += 1
                continue
            rows[key].append((g, style, c))
    plotted = [ln for row in rows.values() for ln in row]
    note, per_label = _seeds_note(plotted)
    layout = {key: _panels(row, max_lines) for key, row in rows.items()}
    ncols = min(max_cols, max((len(p) for p in layout.values()), default=1))
    grid_rows = [math.ceil(len(p) / ncols) for p in layout.values()]
    legend_rows = max((len(lines) for p in layout.values() for _, lines in p), default=1)
    row_height = 2.9 + 0.19 * legend_rows
    fig, axes = _figure(max(1, sum(grid_rows)), ncols, 0.6 + 4.0 * ncols, 0.7 + row_height * max(1, sum(grid_rows)))
    from matplotlib.ticker import MaxNLocator  # after _figure, which explains a missing matplotlib

    what, xlabel = _X[x]
    first_row = 0
    for n_rows, ((data, model), panels) in zip(grid_rows, layout.items()):
        cells = [axes[first_row + i // ncols][i % ncols] for i in range(n_rows * ncols)]
        for ax in cells[1 : len(panels)]:  # one y (and x) scale per (data, model) pair
            ax.sharey(cells[0])
            ax.sharex(cells[0])
        for i, (ax, (name, lines)) in enumerate(zip(cells, panels)):
            for g, style, c in lines:
                xs = {"epoch": c["epoch"], "time": c["time_s"], "compute": c["compute"]}[x]
                mean = [100 * v for v in c["acc_mean"]]
                label = style.label + (f" ({len(g.runs)} seed{'s' if len(g.runs) > 1 else ''})" if per_label else "")
                ax.plot(
                    xs,
                    mean,
                    color=style.color,
                    linestyle=style.linestyle,
                    marker=style.marker,
                    markersize=3.5,
                    markevery=max(1, round(len(xs) / 12)),
                    linewidth=1.3 if style.reference else 1.8,
                    zorder=2 if style.reference else 3,
                    label=label,
                )
                if len(g.runs) > 1:
                    lo = [100 * (m - s) for m, s in zip(c["acc_mean"], c["acc_std"])]
                    hi = [100 * (m + s) for m, s in zip(c["acc_mean"], c["acc_std"])]
                    ax.fill_between(xs, lo, hi, alpha=0.15, color=style.color, linewidth=0)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(xlabel)
            if ylim is not None:
                ax.set_ylim(*ylim)
            if x == "epoch":  # whole epochs only: a 2-epoch run gets ticks 1 and 2, not 1.2, 1.4, ...
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if i % ncols == 0:
                ax.set_ylabel("test accuracy (%)" if len(layout) == 1 else f"{data}, {model}\ntest accuracy (%)")
            else:
                ax.tick_params(labelleft=False)
            ax.grid(alpha=0.3)
            if lines:
                ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8, frameon=False)
            else:
                ax.text(0.5, 0.5, f"no {what} recorded by these runs", transform=ax.transAxes, ha="center")
        for ax in cells[len(panels) :]:
            ax.set_visible(False)
        first_row += n_rows
    head = title or (
        f"Test accuracy against {what}" + (": {}, {}".format(*next(iter(layout))) if len(layout) == 1 else "")
    )
    notes = [n for n in (note, f"{left_out} group(s) without a compute record left out" if left_out else "") if n]
    width_in = fig.get_size_inches()[0]
    title_lines = [_wrap(head, width_in, 11), *(_wrap(n, width_in, 9) for n in notes)]
    fig.suptitle("\n".join(title_lines), fontsize=11 if not notes else 10)
    for target in targets:
        fig.savefig(target, dpi=120 if target.suffix == ".png" else None)
    return fig


def _wrap(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (an average
    character is about 0.55 em wide), so that a title never runs off the canvas."""
    import textwrap

    chars = max(20, int(0.92 * width_in * 72 / (0.55 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars)) or text


def _targets(path: str | os.PathLike[str], formats: Sequence[str] | None) -> list[Path]:
    """The files to write: ``path`` itself, or ``path`` with each of ``formats`` as its suffix."""
    p = Path(path)
    if formats is None:
        return [p]
    if isinstance(formats, str) or not formats:
        raise ValueError(f"formats must be a non-empty list of 'png', 'pdf', 'svg', got {formats!r}")
    out = []
    for fmt in formats:
        f = str(fmt).lower().lstrip(".")
        if f not in ("png", "pdf", "svg"):
            raise ValueError(f"formats must contain 'png', 'pdf' or 'svg', got {fmt!r}")
        out.append(p.with_suffix(f".{f}"))
    return list(dict.fromkeys(out))


__all__ = ["FAMILIES", "MethodStyle", "method_style", "method_styles", "plot_accuracy"]
