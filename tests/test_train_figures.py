"""The training wing's figures: one fixed style per method (sparsam.runs.figures.method_style)."""

from __future__ import annotations

import colorsys

import pytest

from sparsam.train import TrainConfig
from sparsam.runs.figures import method_style, method_styles

W = {"epochs": 20, "weight_decay": 1e-3}
# The regime study's grid (benchmarks/cifar_study.sh): method settings -> the label in words.
GRID = [
    ({"opt": "sgd", "epochs": 20, "weight_decay": 5e-4}, "SGD"),
    ({"opt": "sgd", "epochs": 40, "weight_decay": 5e-4}, "SGD, 40 epochs"),
    ({"opt": "sam", **W}, "SAM"),
    ({"opt": "ssam", "mask": "fisher", "sparsity": 0.5, **W}, "SSAM-F, 50%"),
    ({"opt": "ssam", "mask": "fisher", "sparsity": 0.9, **W}, "SSAM-F, 90%"),
    ({"opt": "ssam", "mask": "dynamic", "sparsity": 0.5, **W}, "SSAM-D, 50%"),
    ({"opt": "ssam", "mask": "dynamic", "sparsity": 0.9, **W}, "SSAM-D, 90%"),
    ({"opt": "ssam", "mask": "norm", **W}, "norm layers only"),
    ({"opt": "sam", "sam_every": 2, **W}, "SAM every 2 steps"),
    ({"opt": "sam", "sam_start": 0.75, **W}, "late-phase SAM (last 25%)"),
    ({"opt": "sam", "ascent_fraction": 0.25, **W}, "SAM, ascent on 25% of the batch"),
    ({"opt": "looksam", "look_k": 5, **W}, "LookSAM-5"),
    ({"opt": "esam", **W}, "ESAM"),
]


def full(settings):
    """A whole config.json as a run directory holds it (every key, wrapped in "config")."""
    return {"config": {**TrainConfig().to_dict(), **settings}, "sparsam_version": "x"}


def lightness(color):
    r, g, b = (int(color[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)[1]


def test_fixed_colours_of_the_references_and_the_families():
    assert method_style({"opt": "sgd"}).color == "#8c8c8c"  # grey
    assert method_style({"opt": "sam"}).color == "#000000"  # black
    assert method_style({"opt": "sgd"}).reference and method_style({"opt": "sam"}).reference
    assert method_style({"opt": "asam"}).family == "SAM" and method_style({"opt": "asam"}).color != "#000000"
    fam = {
        s["opt"] + s.get("mask", ""): method_style(s).family
        for s in (
            {"opt": "ssam", "mask": "fisher"},
            {"opt": "ssam", "mask": "dynamic"},
            {"opt": "ssam", "mask": "random"},
            {"opt": "ssam", "mask": "norm"},
            {"opt": "looksam"},
            {"opt": "lookssam", "mask": "fisher"},
            {"opt": "esam"},
        )
    }
    assert fam == {
        "ssamfisher": "SSAM-F",
        "ssamdynamic": "SSAM-D",
        "ssamrandom": "other SSAM",
        "ssamnorm": "other SSAM",
        "looksam": "cheaper SAM",
        "lookssamfisher": "cheaper SAM",
        "esam": "cheaper SAM",
    }
    assert method_style({"opt": "ssam", "mask": "fisher", "sam_every": 2}).family == "cheaper SAM"


@pytest.mark.parametrize("mask", ["fisher", "dynamic", "random"])
def test_sparsity_is_lightness_within_one_hue(mask):
    colors = [method_style({"opt": "ssam", "mask": mask, "sparsity": s}).color for s in (0.5, 0.9, 0.99)]
    light = [lightness(c) for c in colors]
    assert light[0] < light[1] < light[2]  # 50% darkest, 99% lightest
    hues = [colorsys.rgb_to_hls(*(int(c[i : i + 2], 16) / 255 for i in (1, 3, 5)))[0] for c in colors]
    assert max(hues) - min(hues) < 0.02  # one hue (up to the rounding to 8-bit channels)


def test_the_study_grid_gets_words_and_never_a_repeated_colour():
    styles = method_styles([s for s, _ in GRID])
    assert [s.label for s in styles] == [label for _, label in GRID]
    assert len({s.color for s in styles}) == len(GRID)
    assert styles[0].color == "#8c8c8c" and styles[2].color == "#000000"
    # the same from whole config.json dicts (every key present, most of them owned by other methods)
    assert [s.label for s in method_styles([full(s) for s, _ in GRID])] == [label for _, label in GRID]
    assert method_style(full({"opt": "ssam", "mask": "fisher", "sparsity": 0.9})).label == "SSAM-F, 90%"


def test_patterns_and_settings_that_differ():
    nm = method_style({"opt": "ssam", "mask": "fisher", "pattern": "nm", "nm": "1:4", "sparsity": 0.5})
    assert nm.label == "SSAM-F, 75%, 1:4"  # keep 1 of every 4: 75% left unperturbed
    st = method_style({"opt": "ssam", "mask": "fisher", "pattern": "structured", "sparsity": 0.5})
    assert st.label == "SSAM-F, 50%, structured"
    assert len({nm.marker, st.marker, method_style({"opt": "ssam", "mask": "fisher"}).marker}) == 3
    assert method_style({"opt": "lookssam", "mask": "dynamic", "sparsity": 0.9}).label == "LookSSAM-5 (SSAM-D, 90%)"
    # a setting outside the method is named where it is not the most common value, in words
    styles = method_styles(
        [
            {"opt": "sam", "weight_decay": 1e-3},
            {"opt": "sam", "weight_decay": 5e-4},
            {"opt": "sgd", "weight_decay": 1e-3},
        ]
    )
    assert [s.label for s in styles] == ["SAM", "SAM, wd 0.0005", "SGD"]
    assert len({s.color for s in styles}) == 3 and styles[1].linestyle != "-"  # a second SAM: another shade, dashed
    # keys= limits which settings may be named
    assert method_styles([{"opt": "sam", "lr": 0.1}, {"opt": "sam", "lr": 0.2}], keys=["epochs"])[1].label == "SAM"


# ------------------------------------------------------------------------------------------ plot_accuracy
def runs_of(settings, seeds=(0, 1), epochs=5, compute=True, data="/d/cifar10", model="resnet18"):
    from sparsam.runs.rundir import RunRecord

    out = []
    for seed in seeds:
        cfg = {**TrainConfig().to_dict(), "epochs": epochs, **settings, "seed": seed, "data": data, "model": model}
        rows = [
            {
                "epoch": e,
                "test_acc": 0.1 * e + 0.01 * seed,
                "epoch_time_s": 1.0,
                "time_s": float(e),
                **({"compute": 10.0 * e} if compute else {}),
            }
            for e in range(1, epochs + 1)
        ]
        out.append(RunRecord(f"/runs/{settings['opt']}-{seed}", cfg, {}, rows, {"finished": True}))
    return out


def study_groups(**kw):
    from sparsam.runs.tables import group_runs

    return group_runs([r for s, _ in GRID for r in runs_of({**s, "epochs": s.get("epochs", 5)}, **kw)])


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_small_multiples_with_the_references_in_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsam.runs.figures import plot_accuracy

    fig = plot_accuracy(study_groups(), tmp_path / "acc.png", x="epoch", varying=["epochs", "weight_decay"])
    assert (tmp_path / "acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = visible_axes(fig)
    # SSAM-F, SSAM-D, other masks, and the cheaper variants split in two (5 members + 3 references > 6)
    assert [ax.get_title() for ax in axes] == [
        "SSAM-F (Fisher mask)",
        "SSAM-D (dynamic mask)",
        "other masks",
        "cheaper SAM variants (1/2)",
        "cheaper SAM variants (2/2)",
    ]
    seen: dict[str, str] = {}
    drawn = set()
    for ax in axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert labels[:3] == ["SGD", "SGD, 40 epochs", "SAM"]  # the references, in every panel
        assert len(labels) <= 6
        colors = [line.get_color() for line in ax.get_lines()]
        assert len(set(colors)) == len(colors)
        for label, color in zip(labels, colors):
            assert seen.setdefault(label, color) == color  # one colour per method across the panels
        drawn |= set(labels)
        assert len(ax.collections) == len(labels)  # a ± std band per line (two seeds each)
        legend = ax.get_legend()
        assert legend.get_window_extent().y1 <= ax.get_window_extent().y0  # below the data, not on it
        assert ax.get_xlabel() == "epoch"
    assert drawn == {label for _, label in GRID}  # every group drawn
    assert axes[0].get_ylabel() == "test accuracy (%)"
    assert "2 seeds" in fig.get_suptitle() and "cifar10, resnet18" in fig.get_suptitle()
    assert seen["SGD"] == "#8c8c8c" and seen["SAM"] == "#000000"


def test_compute_leaves_out_groups_without_a_record_and_rows_per_pair(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsam.runs.figures import plot_accuracy
    from sparsam.runs.tables import group_runs

    runs = runs_of({"opt": "sgd"}) + runs_of({"opt": "sam"}, compute=False)
    runs += runs_of({"opt": "ssam", "mask": "fisher", "sparsity": 0.5})
    runs += runs_of({"opt": "sgd"}, seeds=(0,), data="/d/cifar100", model="wrn16")
    runs += runs_of({"opt": "ssam", "mask": "fisher", "sparsity": 0.5}, seeds=(0,), data="/d/cifar100", model="wrn16")
    groups = group_runs(runs)
    fig = plot_accuracy(groups, tmp_path / "c.png", x="compute")
    axes = visible_axes(fig)
    assert len(axes) == 2  # one row per (data, model)
    assert [ax.get_ylabel().split("\n")[0] for ax in axes] == ["cifar10, resnet18", "cifar100, wrn16"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["SGD (2 seeds)", "SSAM-F, 50% (2 seeds)"]
    assert axes[0].get_lines()[1].get_xdata().tolist() == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert "1 group(s) without a compute record left out" in fig.get_suptitle()
    # the same method keeps its colour from row to row
    assert axes[0].get_lines()[1].get_color() == axes[1].get_lines()[1].get_color()
    fig = plot_accuracy(groups, tmp_path / "t.png", x="time", title="digits")
    assert "SAM (2 seeds)" in [line.get_label() for line in visible_axes(fig)[0].get_lines()]
    assert fig.get_suptitle().startswith("digits\n")
    with pytest.raises(ValueError, match="'flops'"):
        plot_accuracy(groups, tmp_path / "x.png", x="flops")


def test_a_large_family_is_split_and_patterns_get_their_own_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsam.runs.figures import plot_accuracy
    from sparsam.runs.tables import group_runs

    f = {"opt": "ssam", "mask": "fisher"}
    runs = runs_of({"opt": "sgd"}, seeds=(0,)) + runs_of({"opt": "sam"}, seeds=(0,))
    for s in (0.5, 0.8, 0.9, 0.99):
        runs += runs_of({**f, "sparsity": s}, seeds=(0,))
    runs += runs_of({**f, "pattern": "structured"}, seeds=(0,)) + runs_of({**f, "pattern": "nm"}, seeds=(0,))
    fig = plot_accuracy(group_runs(runs), tmp_path / "p.png", x="epoch", max_lines=5)
    panels = [(ax.get_title(), [line.get_label() for line in ax.get_lines()]) for ax in visible_axes(fig)]
    refs = ["SGD", "SAM"]
    assert panels == [  # 3 methods a panel at most besides the references, unstructured ones by sparsity
        ("SSAM-F (Fisher mask), unstructured (1/2)", [*refs, "SSAM-F, 50%", "SSAM-F, 80%"]),
        ("SSAM-F (Fisher mask), unstructured (2/2)", [*refs, "SSAM-F, 90%", "SSAM-F, 99%"]),
        ("SSAM-F (Fisher mask), other patterns", [*refs, "SSAM-F, 50%, 2:4", "SSAM-F, 50%, structured"]),
    ]
    assert "one seed per line" in fig.get_suptitle()
    assert all(not ax.collections for ax in visible_axes(fig))  # one seed: no band
    with pytest.raises(ValueError, match="max_lines"):
        plot_accuracy(group_runs(runs), tmp_path / "p.png", x="epoch", max_lines=2)


def test_few_lines_share_one_panel_and_an_empty_figure_says_why(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsam.runs.figures import plot_accuracy
    from sparsam.runs.tables import group_runs

    settings = [{"opt": "sgd"}, {"opt": "sam"}, {"opt": "ssam", "mask": "fisher"}, {"opt": "ssam", "mask": "dynamic"}]
    groups = group_runs([r for s in settings for r in runs_of(s, seeds=(0,))])
    (ax,) = visible_axes(plot_accuracy(groups, tmp_path / "d.png", x="time"))
    assert [line.get_label() for line in ax.get_lines()] == ["SGD", "SAM", "SSAM-F, 50%", "SSAM-D, 50%"]
    assert ax.get_xlabel().startswith("training time (s")
    groups = group_runs(runs_of({"opt": "sgd"}, compute=False))
    (ax,) = visible_axes(plot_accuracy(groups, tmp_path / "e.png", x="compute"))
    assert not ax.get_lines() and "no training compute recorded by these runs" in ax.texts[0].get_text()
