"""Plots of test accuracy against epochs and against training time (matplotlib, imported lazily),
and the project's fixed colours and words for every method (``method_style``).

Every figure of the project draws a method in the same colour: SGD grey, SAM black (ASAM a dark
grey), SSAM-F blues and SSAM-D oranges with the sparsity as lightness (50% dark, 99% light),
the other masks (SSAM-R, norm layers only) raspberry and magenta, the cheaper SAM variants greens
(every-k, late-phase, sub-batch ascent), purples (LookSAM, LookSSAM) and teal (ESAM).
"""

from __future__ import annotations

import colorsys
import math
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .config import IDENTITY_KEYS
from .methods import is_scheduled, relevant
from .tables import Group, curves

#: the families, in panel order; SGD and SAM are the references drawn in every panel
FAMILIES: tuple[str, ...] = ("SGD", "SAM", "SSAM-F", "SSAM-D", "other SSAM", "cheaper SAM", "other")
REFERENCES: frozenset[str] = frozenset({"SGD", "SAM"})


@dataclass(frozen=True)
class MethodStyle:
    """How one method is drawn in every figure of the project.

    Attributes:
        color: its colour, ``#rrggbb``: SGD grey, SAM black, SSAM-F blues, SSAM-D oranges (sparsity
            as lightness), other masks raspberry and magenta, cheaper SAM variants greens, purples
            and teal.
        label: the method in words: ``"SGD"``, ``"SSAM-F, 50%"``, ``"SAM every 2 steps"``, ...
        family: one of ``FAMILIES``: ``"SGD"``, ``"SAM"`` (the references), ``"SSAM-F"``,
            ``"SSAM-D"``, ``"other SSAM"``, ``"cheaper SAM"``, ``"other"``; a figure's panel.
        marker: a matplotlib marker.
        linestyle: a matplotlib line style.
    """

    color: str
    label: str
    family: str
    marker: str = "o"
    linestyle: str = "-"

    @property
    def reference(self) -> bool:
        """SGD and SAM (and ASAM): drawn in every panel as the references."""
        return self.family in REFERENCES


def _hex(hue_deg: float, lightness: float, saturation: float = 0.7) -> str:
    r, g, b = colorsys.hls_to_rgb((hue_deg % 360) / 360, min(max(lightness, 0.0), 1.0), saturation)
    return "#{:02x}{:02x}{:02x}".format(*(round(255 * c) for c in (r, g, b)))


# Sparsity -> lightness (piecewise linear): 50% dark, 90% middle, 99% light.
_LIGHTNESS = ((0.0, 0.2), (0.5, 0.27), (0.8, 0.38), (0.9, 0.47), (0.95, 0.55), (0.99, 0.65), (0.999, 0.74))


def _lightness(sparsity: float) -> float:
    pts = _LIGHTNESS
    if sparsity <= pts[0][0]:
        return pts[0][1]
    for (s0, l0), (s1, l1) in zip(pts, pts[1:]):
        if sparsity <= s1:
            return l0 + (l1 - l0) * (sparsity - s0) / (s1 - s0)
    return pts[-1][1]


# hue (degrees) of each mask source, per pattern; marker per pattern
_MASK_HUE = {"fisher": 212.0, "dynamic": 27.0, "random": 335.0}
# (hue shift, lightness shift) of a pattern: structured towards indigo, N:M towards cyan
_PATTERN_SHIFT = {"unstructured": (0.0, 0.0), "structured": (24.0, 0.06), "nm": (-22.0, 0.1)}
_PATTERN_MARKER = {"unstructured": "o", "structured": "s", "nm": "^"}
_MASK_FAMILY = {"fisher": "SSAM-F", "dynamic": "SSAM-D"}


def _num(v: Any, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def _nm(settings: Mapping[str, Any]) -> tuple[int, int] | None:
    try:
        n, m = (int(p) for p in str(settings.get("nm", "2:4")).split(":"))
    except ValueError:
        return None
    return (n, m) if 0 < n <= m else None


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


def _mask_part(s: Mapping[str, Any]) -> tuple[str, str, float, float, str]:
    """(label, family, hue, lightness, marker) of an SSAM-family method's mask."""
    mask = str(s.get("mask", "fisher"))
    if mask == "norm":
        return "norm layers only", "other SSAM", 305.0, 0.45, "D"
    pattern = str(s.get("pattern", "unstructured"))
    nm = _nm(s) if pattern == "nm" else None
    sparsity = 1 - nm[0] / nm[1] if nm else _num(s.get("sparsity"), 0.5)
    short = {"fisher": "F", "dynamic": "D", "random": "R"}.get(mask, mask)
    label = f"SSAM-{short}, {_pct(sparsity)}"
    if nm:
        label += f", {nm[0]}:{nm[1]}"
    elif pattern != "unstructured":
        label += f", {pattern}"
    dhue, dlight = _PATTERN_SHIFT.get(pattern, (36.0, 0.12))
    hue = _MASK_HUE.get(mask, 240.0) + dhue
    marker = _PATTERN_MARKER.get(pattern, "v")
    return label, _MASK_FAMILY.get(mask, "other SSAM"), hue, _lightness(sparsity) + dlight, marker


def _schedule(s: Mapping[str, Any], base: str) -> tuple[str, float, float, str]:
    """(label, hue, lightness, marker) of a time schedule / sub-batch ascent on top of ``base``."""
    every = int(_num(s.get("sam_every"), 1))
    start = _num(s.get("sam_start"), 0.0)
    ramp = _num(s.get("rho_ramp"), 0.0)
    asc = _num(s.get("ascent_fraction"), 1.0)
    plain = "," not in base
    label = base
    if every != 1:
        label += f" every {every} steps" if plain else f", every {every} steps"
    if start:
        if label == "SAM":
            label = f"late-phase SAM (last {_pct(1 - start)})"
        else:
            label += f", late phase (last {_pct(1 - start)})"
    if ramp:
        label += f", ρ ramped over {_pct(ramp)}"
    if asc != 1:
        label += f", ascent on {_pct(asc)} of the batch"
    if every != 1:  # greens: every-k dark (lighter for larger k), late phase sea green, sub-batch yellow-green
        return label, 125.0, min(0.28 + 0.07 * math.log2(max(every, 2) / 2), 0.6), "v"
    if start:
        return label, 155.0, 0.42, "<"
    if asc != 1:
        return label, 85.0, 0.5, ">"
    return label, 105.0, 0.36, "p"


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
    from sparsam.train.figures import method_style

    style = method_style({"opt": "ssam", "mask": "fisher", "sparsity": 0.5})
    assert style.label == "SSAM-F, 50%" and style.family == "SSAM-F"
    assert method_style({"opt": "sgd"}).label == "SGD"
    ```
    """
    s = _identity(settings)
    opt = str(s.get("opt", "sgd"))
    adaptive = s.get("adaptive") is True or opt == "asam"
    if opt == "sgd":
        return MethodStyle("#8c8c8c", "SGD", "SGD", "s")
    if opt in ("sam", "asam"):
        base, color, family, marker = ("ASAM", "#4d4d4d", "SAM", "D") if adaptive else ("SAM", "#000000", "SAM", "o")
        if not is_scheduled(s):
            return MethodStyle(color, base, family, marker, "--" if adaptive else "-")
        label, hue, lightness, marker = _schedule(s, base)
        return MethodStyle(_hex(hue, lightness + (0.1 if adaptive else 0.0), 0.6), label, "cheaper SAM", marker)
    if opt == "ssam":
        label, family, hue, lightness, marker = _mask_part(s)
        if adaptive:
            label += ", adaptive"
        if not is_scheduled(s):
            return MethodStyle(_hex(hue, lightness), label, family, marker)
        label, hue, lightness, marker = _schedule(s, label)  # SSAM on a schedule: the schedule's hue, lighter
        return MethodStyle(_hex(hue, lightness + 0.15, 0.55), label, "cheaper SAM", marker, "--")
    k = int(_num(s.get("look_k"), 5))
    if opt == "looksam":
        label = f"LookSAM-{k}"
        return MethodStyle(_hex(265, 0.42, 0.55), _with_schedule(s, label), "cheaper SAM", "P")
    if opt == "lookssam":
        label = f"LookSSAM-{k} ({_mask_part(s)[0]})"
        return MethodStyle(_hex(280, 0.62, 0.55), _with_schedule(s, label), "cheaper SAM", "X")
    if opt == "esam":
        return MethodStyle(_hex(178, 0.3, 0.7), _with_schedule(s, "ESAM"), "cheaper SAM", "*")
    # an optimizer this version does not know: a stable colour from its name
    hue = sum(map(ord, opt)) * 47 % 360
    return MethodStyle(_hex(hue, 0.45, 0.5), opt.upper(), "other", "h")


def _with_schedule(s: Mapping[str, Any], label: str) -> str:
    """``label`` with the words of a time schedule / sub-batch ascent, if any."""
    return _schedule(s, label)[0] if is_scheduled(s) else label


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
_WORDS = {"weight_decay": "wd", "batch_size": "batch", "lr": "lr", "rho": "ρ", "train_subset": "train subset"}


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
    from .methods import is_sparse

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


__all__ = ["FAMILIES", "MethodStyle", "method_style", "method_styles", "plot_accuracy"]
