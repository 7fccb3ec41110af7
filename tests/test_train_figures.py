"""The training wing's figures: one fixed style per method (sparsam.train.figures.method_style)."""

from __future__ import annotations

import colorsys

import pytest

from sparsam.train import TrainConfig
from sparsam.train.figures import method_style, method_styles

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
