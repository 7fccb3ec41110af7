"""sparsam.analysis: run-level mask statistics, figures and the report writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsam import analysis as A
from sparsam.analysis import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------------------------------------
# Mask statistics
# ---------------------------------------------------------------------------------------------


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))


def b(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.bool)


RUN = [
    {"w": b(1, 1, 0, 0), "v": b(1, 0)},
    {"w": b(1, 0, 1, 0), "v": b(1, 0)},
    {"w": b(0, 0, 1, 1), "v": b(0, 1)},
]


def test_layer_and_overall_densities():
    assert A.layer_densities(RUN) == {"w": [0.5, 0.5, 0.5], "v": [0.5, 0.5, 0.5]}
    assert A.overall_densities(RUN) == [0.5, 0.5, 0.5]
    # pooled, not averaged: 1 of 4 and 2 of 2 is 3 of 6
    assert A.overall_densities([{"w": b(1, 0, 0, 0), "v": b(1, 1)}]) == [0.5]


def test_overlaps_by_hand():
    ov = A.mask_overlaps(RUN)
    # step 0 -> 1: w: {0,1} vs {0,2}: inter 1, union 3; v: {0} vs {0}: inter 1, union 1 -> pooled 2 / 4
    # step 1 -> 2: w: {0,2} vs {2,3}: inter 1, union 3; v: {0} vs {1}: inter 0, union 2 -> pooled 1 / 5
    assert ov["jaccard"] == pytest.approx([2 / 4, 1 / 5])
    assert ov["overlap"] == pytest.approx([2 / 3, 1 / 3])
    assert ov["changed"] == [2, 4]
    assert ov["layer_jaccard"]["w"] == pytest.approx([1 / 3, 1 / 3])
    assert ov["layer_jaccard"]["v"] == pytest.approx([1.0, 0.0])
    empty = [{"w": b(0, 0)}, {"w": b(0, 0)}]
    assert A.mask_overlaps(empty)["jaccard"] == [1.0] and math.isnan(A.mask_overlaps(empty)["overlap"][0])


def test_summary_ever_and_always_active_and_missing_names():
    s = A.mask_run_summary(RUN)
    assert s["steps"] == 3
    assert s["ever_active"] == pytest.approx(6 / 6)
    assert s["always_active"] == pytest.approx(0.0)
    # a name missing at one step is all False there
    run = [{"w": b(1, 1), "v": b(1, 0)}, {"w": b(1, 0)}]
    assert A.layer_densities(run)["v"] == [0.5, 0.0]
    json.dumps(s)  # plain types only


def test_density_by_type_and_depth_with_a_model():
    net = small_net()
    masks = [
        {
            n: torch.ones_like(p, dtype=torch.bool) if n.startswith("1.") else torch.zeros_like(p, dtype=torch.bool)
            for n, p in net.named_parameters()
        }
    ]
    masks.append({n: torch.ones_like(p, dtype=torch.bool) for n, p in net.named_parameters() if p.dim() > 1})
    by_type = A.density_by_type(masks, net)
    assert by_type["BatchNorm2d.weight"] == [1.0, 0.0]
    assert by_type["Conv2d.weight"] == [0.0, 1.0]
    assert by_type["Linear.bias"] == [0.0, 0.0]
    depth = A.density_by_depth(masks, net)
    assert list(depth) == ["0", "1", "3"]  # model order; the Flatten owns no parameters
    assert depth["1"] == pytest.approx(0.5)
    assert depth["0"] == pytest.approx((0 + 18 / 20) / 2)
    without_model = A.density_by_type(masks)
    assert set(without_model) == {"matrix/conv (ndim >= 2)", "vector (ndim <= 1)"}


def test_per_step_numbers_agree_with_sparsam_masks_mask_stats():
    stats = pytest.importorskip("sparsam.masks.stats")
    g = torch.Generator().manual_seed(0)
    run = [{"a": torch.rand(5, 4, generator=g) < 0.3, "b": torch.rand(7, generator=g) < 0.6} for _ in range(4)]
    run[2].pop("b")  # missing: all False in both conventions
    dens, ov = A.overall_densities(run), A.mask_overlaps(run)
    for t, m in enumerate(run):
        full = {**{"b": torch.zeros(7, dtype=torch.bool)}, **m}
        ref = stats.mask_stats(full, None if t == 0 else run[t - 1])
        assert dens[t] == pytest.approx(ref["density"])
        if t:
            assert ov["jaccard"][t - 1] == pytest.approx(ref["jaccard"])
            assert ov["overlap"][t - 1] == pytest.approx(ref["overlap"])
            assert ov["changed"][t - 1] == ref["changed"]


def test_numeric_zero_one_masks_are_accepted():
    assert A.layer_densities([{"w": torch.tensor([1.0, 0.0])}]) == {"w": [0.5]}


@pytest.mark.parametrize(
    "masks, exc, match",
    [
        ([], ValueError, "masks is empty"),
        ({"w": b(1)}, TypeError, "single dict"),
        ([{"w": torch.tensor([0.5, 1.0])}], ValueError, r"masks\[0\]\['w'\]"),
        ([{"w": b(1, 0)}, {"w": b(1, 0, 1)}], ValueError, r"masks\[1\]\['w'\] has shape \(3,\)"),
        ([{"w": [1, 0]}], TypeError, r"masks\[0\]\['w'\]"),
    ],
)
def test_mask_statistics_bad_input(masks, exc, match):
    with pytest.raises(exc, match=match):
        A.layer_densities(masks)


def test_mask_name_not_in_model():
    with pytest.raises(ValueError, match="'nope'"):
        A.density_by_type([{"nope": b(1)}], small_net())


# ---------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------


def assert_figures(paths, stem, pdf=False):
    assert [p.suffix for p in paths] == ([".png", ".pdf"] if pdf else [".png"])
    assert all(p.stem == stem for p in paths)
    assert paths[0].read_bytes()[:8] == PNG_MAGIC and paths[0].stat().st_size > 1000
    if pdf:
        assert paths[1].read_bytes()[:5] == b"%PDF-" and paths[1].stat().st_size > 1000


PNG = {"formats": ("png",)}  # PDF writing is tested once: it is the slow part


def landscape(scale):
    alphas = np.linspace(-1, 1, 11)
    return {"alphas": alphas.tolist(), "losses": (0.1 + scale * alphas**2).tolist()}


def test_plots_write_non_empty_png_and_pdf(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    assert_figures(
        plots.plot_landscape_1d({"SGD": landscape(2.0), "SSAM": landscape(0.5)}, tmp_path / "l1.png"), "l1", pdf=True
    )
    a = np.linspace(-1, 1, 7)
    surf = {"alphas": a.tolist(), "betas": a[:5].tolist(), "losses": (a[:, None] ** 2 + 2 * a[None, :5] ** 2).tolist()}
    assert_figures(plots.plot_landscape_2d({"SGD": surf, "SAM": surf}, tmp_path / "l2", **PNG), "l2")
    assert_figures(plots.plot_landscape_2d(surf, tmp_path / "l2_single", **PNG), "l2_single")
    sd = {"grid": np.linspace(-1, 5, 50), "density": np.exp(-(np.linspace(-1, 5, 50) ** 2))}
    runs = {
        "SGD": {"top_eigenvalues": [9.0, 4.0, 3.5], "trace": 40.0, "spectral_density": sd},
        "SSAM": {"top_eigenvalues": [3.0, 2.0]},
    }
    assert_figures(plots.plot_spectra(runs, tmp_path / "spec", **PNG), "spec")
    assert_figures(plots.plot_spectra({"SGD": {"top_eigenvalues": [1.0]}}, tmp_path / "spec1", **PNG), "spec1")
    assert_figures(plots.plot_mask_density({"conv1": 0.2, "bn1": 1.0, "fc": 0.05}, tmp_path / "md", **PNG), "md")
    assert_figures(
        plots.plot_mask_density(
            {"F": {"conv1": 0.2, "fc": 0.1}, "D": {"conv1": 0.3, "fc": 0.4}}, tmp_path / "md2", **PNG
        ),
        "md2",
    )
    metrics = [{"epoch": e, "train_loss": 2.0 / e, "test_acc": 0.5 + 0.04 * e} for e in range(1, 6)]
    assert_figures(plots.plot_training_curves({"SGD": metrics, "SSAM": metrics[:3]}, tmp_path / "tc", **PNG), "tc")
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone


def test_run_colours_never_repeat_and_legends_lie_beside_the_data(tmp_path, monkeypatch):
    from sparsam.runs.figures import method_style

    figs = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path, formats: figs.append(fig) or save(fig, path, formats))

    def drawn(ax):
        return [(line.get_label(), line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("_")]

    many = {f"run{i}": landscape(0.1 * i) for i in range(20)}
    plots.plot_landscape_1d(many, tmp_path / "many", **PNG)
    (ax,) = figs[-1].axes
    colors = [c for _, c in drawn(ax)]
    assert len(colors) == 20 and len(set(colors)) == 20  # past the fixed palette too
    assert not {"#000000", "#8c8c8c"} & set(colors)  # SAM's black and SGD's grey stay theirs
    assert ax.get_legend().get_window_extent().x0 >= ax.get_window_extent().x1  # beside the data, not on it
    # with the project's styles: its colours and words; a run without one gets a colour nobody has
    sgd, ssam = method_style({"opt": "sgd"}), method_style({"opt": "ssam", "mask": "fisher", "sparsity": 0.9})
    runs = {"sgd-seed0": landscape(2.0), "ssam-f-s0.9-seed0": landscape(0.5), "mine": landscape(1.0)}
    plots.plot_landscape_1d(runs, tmp_path / "styled", styles={"sgd-seed0": sgd, "ssam-f-s0.9-seed0": ssam}, **PNG)
    got = drawn(figs[-1].axes[0])
    assert got[:2] == [("SGD", sgd.color), ("SSAM-F, 90%", ssam.color)]
    assert got[2][0] == "mine" and got[2][1] not in (sgd.color, ssam.color)
    metrics = [{"epoch": e, "train_loss": 2.0 / e, "test_acc": 0.5 + 0.04 * e} for e in range(1, 6)]
    plots.plot_training_curves(
        {"sgd-seed0": metrics, "x": metrics[:3]}, tmp_path / "tc", styles={"sgd-seed0": sgd}, **PNG
    )
    axes = figs[-1].axes
    assert [ax.get_legend() is not None for ax in axes] == [False, True]  # one legend for both panels
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["SGD", "x"]
    assert axes[1].get_legend().get_window_extent().x0 >= axes[1].get_window_extent().x1
    assert drawn(axes[0])[0] == ("SGD", sgd.color) and drawn(axes[0])[1][1] != sgd.color
    # accuracy in percent, as in the report's tables and figures
    assert max(axes[1].get_lines()[0].get_ydata()) == pytest.approx(70.0) and "%" in axes[1].get_ylabel()
    # the spectra and mask densities in the same colours and words
    plots.plot_spectra(
        {"sgd-seed0": {"top_eigenvalues": [3.0, 1.0]}, "ssam-f-s0.9-seed0": {"top_eigenvalues": [2.0]}},
        tmp_path / "sp",
        styles={"sgd-seed0": sgd, "ssam-f-s0.9-seed0": ssam},
        **PNG,
    )
    ax = figs[-1].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["SGD", "SSAM-F, 90%"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SGD", "SSAM-F, 90%"]
    plots.plot_mask_density(
        {"ssam-f-s0.9-seed0": {"a": 0.1, "b": 0.2}}, tmp_path / "md", styles={"ssam-f-s0.9-seed0": ssam}, **PNG
    )
    ax = figs[-1].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SSAM-F, 90%"]
    from matplotlib.colors import to_hex

    assert to_hex(ax.patches[0].get_facecolor()) == ssam.color


def test_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no metric"):
        plots.plot_training_curves({"a": [{"epoch": 1}]}, tmp_path / "x")
    with pytest.raises(ValueError, match="formats"):
        plots.plot_landscape_1d({"a": landscape(1.0)}, tmp_path / "x", formats=("bmp",))
    bad = {"alphas": [0, 1], "betas": [0, 1, 2], "losses": [[0, 1], [1, 2]]}
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        plots.plot_landscape_2d(bad, tmp_path / "x")


def test_write_report_writes_json_and_applicable_figures(tmp_path):
    results = {
        "SGD": {
            "top_eigenvalues": [9.0, 4.0],
            "trace": 40.0,
            "sharpness": 0.2,
            "landscape_1d": landscape(2.0),
            "metrics": [
                {"epoch": 1, "train_loss": 1.0, "test_acc": 0.6},
                {"epoch": 2, "train_loss": 0.5, "test_acc": 0.7},
            ],
            "mask_density": {"conv1": 0.5},
            "notes": torch.tensor([1.0, math.nan]),
        },
        "SSAM": {"top_eigenvalues": [3.0], "landscape_1d": landscape(0.5), "interpolation": landscape(1.0)},
    }
    paths = A.write_report(results, tmp_path / "out", formats=("png",))
    names = {p.name for p in paths}
    assert {
        "results.json",
        "summary.md",
        "landscape_1d.png",
        "interpolation.png",
        "spectra.png",
        "training_curves.png",
        "mask_density.png",
    } <= names
    assert "landscape_2d.png" not in names  # no run has a 2-D landscape
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["SGD"]["top_eigenvalues"] == [9.0, 4.0]
    assert data["SGD"]["notes"] == [1.0, None]  # tensors become lists, NaN becomes null
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| SGD | 9.00 | 40.0 | 0.200 | 70.00 |" in summary  # three significant digits; accuracy in %


def test_write_report_accepts_computed_objects(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = [(torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,)))]
    loss = nn.functional.cross_entropy
    results = {
        "run": {
            "top_eigenvalues": A.top_eigenvalues(model, loss, data, k=2),
            "spectral_density": A.spectral_density(model, loss, data, n_iter=10),
            "landscape_2d": A.loss_landscape_2d(model, loss, data, alphas=[-1, 0, 1], betas=[-1, 0, 1]),
        }
    }
    paths = A.write_report(results, tmp_path, formats=("png",))
    assert {"spectra.png", "landscape_2d.png"} <= {p.name for p in paths}
    data_json = json.loads((tmp_path / "results.json").read_text())
    assert len(data_json["run"]["spectral_density"]["grid"]) == 1000


def test_write_report_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        A.write_report({}, tmp_path)
    with pytest.raises(ValueError, match=r"results\['a'\]"):
        A.write_report({"a": 3}, tmp_path)
