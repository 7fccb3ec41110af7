"""benchmarks/study_table.py: one row per configuration (main sweep, SGD at twice the epochs, the
cheap variants), with mean ± std, paired differences to SGD and SAM of the same seed, and compute
in SGD-step equivalents; checked against numbers computed here from the run files it reads."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "study_table.py"
_spec = importlib.util.spec_from_file_location("sparsam_bench_study_table", _PATH)
st = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = st
_spec.loader.exec_module(st)

# (folder, name, seed) -> (final acc, best acc, compute, train time); steps = 100 per run.
RUNS = {
    ("main", "sgd", 0): (0.50, 0.52, 100.0, 10.0),
    ("main", "sgd", 1): (0.51, 0.515, 100.0, 12.0),
    ("main", "sgd", 2): (0.49, 0.50, 100.0, 11.0),
    ("main", "sam", 0): (0.52, 0.53, 200.0, 21.0),
    ("main", "sam", 1): (0.515, 0.52, 200.0, 25.0),
    ("main", "sam", 2): (0.505, 0.51, 200.0, 23.0),
    ("sgd-2x", "sgd", 0): (0.505, 0.53, 200.0, 22.0),
    ("variants", "looksam", 0): (0.53, 0.54, 120.0, 13.0),
    ("variants", "looksam", 2): (0.50, 0.505, 120.0, 14.0),
    ("variants", "esam", 1): (0.52, 0.525, 183.25, 19.0),
}


def _write_run(root: Path, folder: str, name: str, seed: int, numbers: tuple[float, ...] | None) -> Path:
    run = root / "runs" / folder / f"{name}-seed{seed}"
    run.mkdir(parents=True)
    if numbers is None:  # an interrupted run: metrics so far, no summary
        (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.9, "compute": 1.0}) + "\n")
        return run
    final, best, compute, time = numbers
    rows = [{"epoch": 1, "test_acc": best, "compute": compute / 2}, {"epoch": 2, "test_acc": final, "compute": compute}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"finished": True, "final_test_acc": final, "best_test_acc": best, "train_time_s": time}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for (folder, name, seed), numbers in RUNS.items():
        _write_run(tmp_path, folder, name, seed, numbers)
    _write_run(tmp_path, "variants", "looksam", 1, None)
    # sparsam analyze's results for seed 0's SGD and SAM and both LookSAM seeds.
    results = {}
    for i, (folder, name, seed, eig, sharp) in enumerate(
        [("main", "sgd", 0, 200.0, 0.8), ("main", "sam", 0, 120.0, 0.5), ("variants", "looksam", 0, 150.0, 0.6)]
        + [("variants", "looksam", 2, 170.0, 0.7)]
    ):
        run = tmp_path / "runs" / folder / f"{name}-seed{seed}"
        results[str(i)] = {"weights": str(run / "best_model.pt"), "top_eigenvalues": [eig, 1.0], "sharpness": sharp}
    (tmp_path / "analysis-seed0").mkdir()
    (tmp_path / "analysis-seed0" / "results.json").write_text(json.dumps(results))
    return tmp_path


def _rows(text: str) -> list[dict[str, list[str]]]:
    """The two tables as {configuration: cells} each."""
    out: list[dict[str, list[str]]] = []
    for block in text.split("\n\n"):
        body = [line for line in block.splitlines() if line.startswith("| ")]
        if body:
            out.append({cells[0]: cells[1:] for cells in (line.strip("| ").split(" | ") for line in body[1:])})
    return out


def _pm(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def _g(values: list[float]) -> str:
    return f"{statistics.fmean(values):.3g} ± {statistics.stdev(values):.3g}"


def _diff(d: list[float]) -> str:
    return f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d) / len(d) ** 0.5:.2f} (n={len(d)})"


def test_every_configuration_has_a_row_with_paired_differences_and_compute(root, capsys):
    st.main(str(root))
    acc, cost = _rows(capsys.readouterr().out)
    # SGD first, SAM second, then the others; the unfinished LookSAM seed is not counted.
    assert list(acc) == ["sgd", "sam", "sgd-2x/sgd", "variants/esam", "variants/looksam"]
    assert list(cost) == list(acc)
    final = {k: 100 * v[0] for k, v in RUNS.items()}
    best = {k: 100 * v[1] for k, v in RUNS.items()}

    seeds, fin, bst, d_sgd_f, d_sgd_b, d_sam_f, d_sam_b, compute, compute_ratio = acc["variants/looksam"]
    assert seeds == "2"
    assert fin == _pm([final[("variants", "looksam", s)] for s in (0, 2)])
    assert bst == _pm([best[("variants", "looksam", s)] for s in (0, 2)])
    assert d_sgd_f == _diff([final[("variants", "looksam", s)] - final[("main", "sgd", s)] for s in (0, 2)])
    assert d_sgd_b == _diff([best[("variants", "looksam", s)] - best[("main", "sgd", s)] for s in (0, 2)])
    assert d_sam_f == _diff([final[("variants", "looksam", s)] - final[("main", "sam", s)] for s in (0, 2)])
    assert d_sam_b == _diff([best[("variants", "looksam", s)] - best[("main", "sam", s)] for s in (0, 2)])
    assert (compute, compute_ratio) == ("120", "1.20x")

    # One seed: the value itself and a one-seed difference; compute 2x for SGD at twice the epochs.
    seeds, fin, _, d_sgd_f, _, d_sam_f, _, compute, compute_ratio = acc["sgd-2x/sgd"]
    assert (seeds, fin, compute, compute_ratio) == ("1", "50.50", "200", "2.00x")
    assert d_sgd_f == f"{50.5 - 50.0:+.2f} (1 seed)" and d_sam_f == f"{50.5 - 52.0:+.2f} (1 seed)"
    assert acc["variants/esam"][7:] == ["183.25", "1.83x"]
    # No difference of a configuration to itself.
    assert acc["sgd"][3] == acc["sgd"][4] == "—" and acc["sam"][5] == acc["sam"][6] == "—"
    assert acc["sam"][3] == _diff([final[("main", "sam", s)] - final[("main", "sgd", s)] for s in (0, 1, 2)])

    # Cost and flatness: mean time and its ratio to SGD's; eigenvalue and sharpness where analysed.
    assert cost["variants/looksam"] == ["13.5", f"{13.5 / 11.0:.2f}x", _g([150.0, 170.0]), _g([0.6, 0.7])]
    assert cost["sam"][:3] == ["23", f"{23 / 11:.2f}x", "120"]
    assert cost["variants/esam"][2:] == ["—", "—"]


def test_runs_without_the_compute_counter_and_an_empty_root(tmp_path, capsys):
    run = _write_run(tmp_path, "main", "sgd", 0, (0.5, 0.5, 100.0, 10.0))
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\n")
    _write_run(tmp_path, "main", "sam", 0, (0.52, 0.52, 200.0, 20.0))
    st.main(str(tmp_path))
    acc, _ = _rows(capsys.readouterr().out)
    assert acc["sgd"][-2:] == ["—", "—"]
    assert acc["sam"][-2:] == ["200", "—"]  # no SGD compute to divide by
    st.main(str(tmp_path / "nothing"))
    assert "no finished runs" in capsys.readouterr().out


def _time_json(path: Path, ratios: dict[str, float]) -> Path:
    path.write_text(json.dumps({"rounds": 1, "configs": {k: {"time_vs_sgd": v} for k, v in ratios.items()}}))
    return path


def test_idle_time_column_from_study_time_json(root, tmp_path, capsys):
    ratios = {"sgd": 1.0, "sam": 1.55, "variants/looksam": 1.17}  # no ESAM row: its cell stays empty
    st.main(str(root), time_file=str(_time_json(tmp_path / "t.json", ratios)))
    _, cost = _rows(capsys.readouterr().out)
    idle = {k: v[2] for k, v in cost.items()}
    # SGD at twice the epochs is twice SGD's epoch by construction
    assert idle == {
        "sgd": "1.00x",
        "sam": "1.55x",
        "sgd-2x/sgd": "2.00x",
        "variants/esam": "—",
        "variants/looksam": "1.17x",
    }


def test_figures_are_written_with_one_colour_per_configuration(root, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    settings = {
        ("main", "sgd"): {"opt": "sgd", "epochs": 2},
        ("main", "sam"): {"opt": "sam", "epochs": 2},
        ("sgd-2x", "sgd"): {"opt": "sgd", "epochs": 4},
        ("variants", "looksam"): {"opt": "looksam", "look_k": 5, "epochs": 2},
        ("variants", "esam"): {"opt": "esam", "epochs": 2},
    }
    for folder, name, seed in RUNS:
        cfg = settings[(folder, name)]
        (root / "runs" / folder / f"{name}-seed{seed}" / "config.json").write_text(json.dumps({"config": cfg}))
    drawn: list[tuple[str, object]] = []  # (label, colour) of every configuration the figures draw
    import matplotlib.axes

    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        drawn.append((kwargs.get("label"), kwargs.get("color")))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    time_file = _time_json(tmp_path / "t.json", {"sgd": 1.0, "sam": 1.55, "variants/looksam": 1.17})
    paths = st.figures(root, tmp_path / "fig", time_file)
    assert [p.name for p in paths] == ["study_accuracy.png", "study_cost.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    # the accuracy chart draws all 5 configurations (SGD at 0), the cost panels 5 (compute) + 4 (idle)
    assert len(drawn) == 5 + 5 + 4
    cost = [d for d in drawn[5:] if d[0] is not None]
    colours = {label: colour for label, colour in cost}
    assert len(set(colours.values())) == len(colours) == 5
    assert "SGD, 4 epochs (SAM's compute)" in colours


def test_a_configuration_far_below_sgd_is_drawn_at_the_edge(tmp_path, monkeypatch):
    """An outlier (here 10 points below SGD) is drawn at the lower edge with its value, and the
    axis keeps the other configurations readable instead of stretching down to it."""
    pytest.importorskip("matplotlib")
    for name, seed, acc in [("sgd", 0, 0.50), ("sam", 0, 0.52)]:
        _write_run(tmp_path, "main", name, seed, (acc, acc, 100.0, 10.0))
    _write_run(tmp_path, "variants", "looksam", 0, (0.40, 0.40, 120.0, 12.0))
    for run, cfg in [("main/sgd-seed0", "sgd"), ("main/sam-seed0", "sam"), ("variants/looksam-seed0", "looksam")]:
        (tmp_path / "runs" / run / "config.json").write_text(json.dumps({"config": {"opt": cfg}}))
    import matplotlib.axes
    import matplotlib.figure

    notes: list[str] = []
    real = matplotlib.axes.Axes.annotate

    def spy(self, text, *args, **kwargs):
        notes.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", spy)
    limits: list[tuple[float, float]] = []
    real_save = matplotlib.figure.Figure.savefig

    def save(fig, *args, **kwargs):
        limits.extend(
            ax.get_xlim() if i == 0 and len(fig.axes) == 1 else ax.get_ylim() for i, ax in enumerate(fig.axes)
        )
        return real_save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", save)
    st.figures(tmp_path, tmp_path / "fig")
    assert "-10.0 (n=1)" in notes and "-10.0" in notes  # its value, written in both figures
    assert all(lo >= st._FLOOR - 0.5 for lo, _ in limits)  # neither axis reaches down to -10


def test_two_configurations_of_one_method_get_their_own_label_and_colour(tmp_path, monkeypatch):
    """LookSAM at α 0.7 and 0.1, ESAM with and without data selection: named by the setting that
    differs, one colour each."""
    pytest.importorskip("matplotlib")
    configs = [
        ("main", "sgd", {"opt": "sgd"}, 0.50),
        ("main", "sam", {"opt": "sam"}, 0.52),
        ("variants", "looksam", {"opt": "looksam", "look_k": 5, "look_alpha": 0.7}, 0.49),
        ("variants", "looksam-a0.1", {"opt": "looksam", "look_k": 5, "look_alpha": 0.1}, 0.515),
        ("variants", "esam", {"opt": "esam", "esam_gamma": 0.5}, 0.48),
        ("variants", "esam-swp", {"opt": "esam", "esam_gamma": 1.0}, 0.51),
    ]
    for folder, name, cfg, acc in configs:
        run = _write_run(tmp_path, folder, name, 0, (acc, acc, 100.0, 10.0))
        (run / "config.json").write_text(json.dumps({"config": {"lr": 0.05, **cfg}}))
    import matplotlib.axes

    drawn: dict[str, object] = {}
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, *args, **kwargs):
        if kwargs.get("label") is not None:
            drawn[kwargs["label"]] = kwargs.get("color")
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    st.figures(tmp_path, tmp_path / "fig")
    assert {"LookSAM-5, α 0.1", "LookSAM-5, α 0.7", "ESAM, γ 1", "ESAM, γ 0.5"} <= set(drawn)
    assert len(set(drawn.values())) == len(drawn) == 6
