"""Write an analysis report from numbers already computed: one JSON file and every figure the
numbers allow. The ``sparsam analyze`` command calls ``write_report``."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import plots

__all__ = ["write_report"]


def _jsonable(x: Any) -> Any:
    """Plain JSON types from numbers, tensors, numpy arrays and result objects (NaN/inf -> None)."""
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return _jsonable(x.to_dict())
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # torch.Tensor, numpy array or scalar
        return _jsonable(x.tolist())
    if isinstance(x, bool) or x is None or isinstance(x, (int, str)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    raise TypeError(f"cannot write a value of type {type(x).__name__} to JSON: {x!r}")


def _summary_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    from ..runs.tables import sig3  # here, not at import: sparsam.analysis stays light

    cols = [
        ("top eigenvalue", lambda r: r.get("top_eigenvalues", [None])[0] if r.get("top_eigenvalues") else None),
        ("trace", lambda r: r.get("trace")),
        ("sharpness", lambda r: r.get("sharpness")),
        ("final test acc (%)", lambda r: (r.get("metrics") or [{}])[-1].get("test_acc")),
    ]
    used = [(name, f) for name, f in cols if any(f(r) is not None for r in results.values())]
    if not used:
        return ""
    lines = ["| run | " + " | ".join(n for n, _ in used) + " |", "|---|" + "---|" * len(used)]
    for run, r in results.items():
        cells = []
        for name, f in used:  # the report's precision rule: accuracy in % with two decimals, measures to 3 digits
            v = f(r)
            cells.append("" if v is None else f"{100 * float(v):.2f}" if "(%)" in name else sig3(float(v)))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    results: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    *,
    formats: plots.Formats = ("png", "pdf"),
    styles: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``results.json``, ``summary.md`` and the applicable figures (PNG and PDF) to ``out_dir``.

    Args:
        results: ``{run name: {...}}``, each run with any of the keys

            - ``"top_eigenvalues"``: list of floats, largest first;
            - ``"trace"``: float;
            - ``"spectral_density"``: a [`SpectralDensity`][sparsam.analysis.SpectralDensity] or a dict with
              ``"grid"`` and ``"density"``;
            - ``"sharpness"``: float;
            - ``"landscape_1d"``: ``{"alphas": [...], "losses": [...]}``;
            - ``"interpolation"``: the same, from
              [`linear_interpolation`][sparsam.analysis.linear_interpolation];
            - ``"landscape_2d"``: ``{"alphas", "betas", "losses"}``;
            - ``"metrics"``: list of per-epoch dicts (``epoch``, ``train_loss``, ``test_acc``, ...);
            - ``"mask_density"``: ``{layer: density}``.

            Other keys are written to the JSON only.
        out_dir: the folder (created if needed).
        formats: the figure formats (``"png"``, ``"pdf"``, ``"svg"``).
        styles: ``{run name: style}`` for the per-run lines of the landscape, interpolation and
            training-curve figures (see `plot_landscape_1d`);
            `sparsam analyze` passes the project's method styles of each run's configuration.

    Returns:
        The paths written: the JSON, the summary, then the figures.

    Figures (each in every format, written only when some run has the data): ``landscape_1d``,
    ``interpolation``, ``landscape_2d``, ``spectra``, ``training_curves``, ``mask_density``.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"results must be a non-empty dict run name -> results, got {results!r}")
    for run, r in results.items():
        if not isinstance(r, Mapping):
            raise ValueError(f"results[{run!r}] must be a dict of results, got {type(r).__name__}")
    from ..runs.checkpoint import write_text

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder for the analysis report")
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    json_path = out / "results.json"  # written atomically: a rerun that fails leaves the old file whole
    write_text(json_path, json.dumps(_jsonable(results), indent=2) + "\n", what="analysis results")
    written.append(json_path)
    table = _summary_table(results)
    summary = out / "summary.md"
    write_text(summary, "# Analysis summary\n\n" + (table or "No scalar results.\n"), what="analysis summary")
    written.append(summary)

    def having(key: str) -> dict[str, Any]:
        return {run: r[key] for run, r in results.items() if r.get(key) is not None}

    if curves := having("landscape_1d"):
        written += plots.plot_landscape_1d(curves, out / "landscape_1d", formats=formats, styles=styles)
    if curves := having("interpolation"):
        written += plots.plot_landscape_1d(
            curves,
            out / "interpolation",
            title="Loss on the line between two checkpoints",
            xlabel=r"$\alpha$ in $(1-\alpha)\,\theta_0 + \alpha\,\theta_1$",
            formats=formats,
            styles=styles,
        )
    if surfaces := having("landscape_2d"):
        written += plots.plot_landscape_2d(surfaces, out / "landscape_2d", formats=formats, styles=styles)
    spectra = {
        run: {k: r[k] for k in ("top_eigenvalues", "spectral_density", "trace") if r.get(k) is not None}
        for run, r in results.items()
        if r.get("top_eigenvalues") or r.get("spectral_density") is not None
    }
    if spectra:
        written += plots.plot_spectra(spectra, out / "spectra", formats=formats, styles=styles)
    if metrics := having("metrics"):
        try:
            written += plots.plot_training_curves(metrics, out / "training_curves", formats=formats, styles=styles)
        except ValueError:
            pass  # per-epoch dicts without any known metric: JSON only
    if masks := having("mask_density"):
        written += plots.plot_mask_density(masks, out / "mask_density", formats=formats, styles=styles)
    return written
