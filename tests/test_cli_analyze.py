"""``sparsam analyze``: run directories and checkpoints in, numbers and figures out, the numbers
equal to the library functions on the same model and batches."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from sparsam import analysis
from sparsam.__main__ import main
from sparsam.models import create_model

from .test_train_engine import run

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run(root / "sgd", opt="sgd", epochs=2)
    run(root / "ssam", opt="ssam", mask="fisher", sparsity=0.5, rho=0.5, num_samples=32, epochs=2)
    return root


def test_two_runs_give_numbers_and_figures(runs, tmp_path, capsys):
    out = tmp_path / "a"
    assert (
        main(
            [
                "analyze",
                str(runs / "sgd"),
                str(runs / "ssam"),
                "--out",
                str(out),
                "--batch-size",
                "45",
                "--surface",
                "3",
                "--trace-samples",
                "4",
                "--density-iters",
                "8",
                "--quiet",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"sgd", "ssam"}
    for name, r in res.items():
        assert r["samples"] == 45 and r["split"] == "test" and r["epoch"] == 2
        assert math.isfinite(r["top_eigenvalues"][0]) and r["top_eigenvalues"][0] > 0
        assert math.isfinite(r["trace"]) and r["sharpness"] >= 0
        assert len(r["landscape_1d"]["losses"]) == 21 and len(r["landscape_2d"]["losses"]) == 3
        assert [m["epoch"] for m in r["metrics"]] == [1, 2]
    assert "mask_density" not in res["sgd"]
    # Per-layer densities of the final masks, by parameter name; weighted by size they give the
    # overall density the engine logged for the last epoch.
    dens = res["ssam"]["mask_density"]
    saved = json.loads((runs / "ssam" / "config.json").read_text())["config"]
    sizes = {n: p.numel() for n, p in create_model(saved["model"], num_classes=10, in_channels=1).named_parameters()}
    assert set(dens) == set(sizes)
    assert all(0.0 <= d <= 1.0 for d in dens.values()) and min(dens.values()) < 1.0
    overall = sum(dens[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert overall == pytest.approx(res["ssam"]["metrics"][-1]["mask_density"], abs=1e-6)
    for fig in ("landscape_1d", "landscape_2d", "spectra", "training_curves", "mask_density"):
        for ext in ("png", "pdf"):
            assert (out / f"{fig}.{ext}").stat().st_size > 1000, fig
    assert "| sgd |" in (out / "summary.md").read_text()


def test_numbers_equal_the_library_on_the_same_model_and_batch(runs, tmp_path):
    out = tmp_path / "b"
    assert (
        main(
            [
                "analyze",
                str(runs / "sgd"),
                "--out",
                str(out),
                "--batch-size",
                "30",
                "--points",
                "5",
                "--quiet",
                "--top-k",
                "2",
            ]
        )
        == 0
    )
    r = json.loads((out / "results.json").read_text())["sgd"]
    # Rebuild by hand: the run's model and final weights, the first 30 test images (digits test
    # subset of the run, normalised as in training), eval mode.
    from sparsam.train import build_config
    from sparsam.train.loaders import build_data

    saved = json.loads((runs / "sgd" / "config.json").read_text())["config"]
    cfg = build_config([("t", {**saved, "eval_batch_size": 30})])
    data = build_data(cfg, device=torch.device("cpu"), batch_per_rank=cfg.batch_size)
    x, y = next(iter(data.test))
    ckpt = torch.load(runs / "sgd" / "checkpoint.pt", map_location="cpu", weights_only=False)
    model = create_model(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels, width=cfg.width)
    model.load_state_dict(ckpt["model"])
    model.eval()
    loss_fn = nn.CrossEntropyLoss()
    assert r["loss"] == pytest.approx(loss_fn(model(x), y).item(), rel=1e-6)
    eig = analysis.top_eigenvalues(model, loss_fn, [(x, y)], k=2, generator=0)
    assert r["top_eigenvalues"] == pytest.approx(eig, rel=1e-6)
    sharp = analysis.sam_sharpness(model, loss_fn, [(x, y)], rho=0.05)
    assert r["sharpness"] == pytest.approx(sharp, rel=1e-6)
    assert r["landscape_1d"]["alphas"] == pytest.approx([-1, -0.5, 0, 0.5, 1])
    assert r["landscape_1d"]["losses"][2] == pytest.approx(r["loss"], rel=1e-6)


def test_a_checkpoint_file_and_the_default_out(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", str(runs / "ssam" / "best_model.pt"), "--points", "0", "--rho", "0", "--quiet"]) == 0
    # beside what was read, never in the current folder: a checkpoint file's analysis goes into its folder
    assert not (tmp_path / "analysis").exists()
    res = json.loads((runs / "ssam" / "analysis" / "results.json").read_text())
    assert list(res) == ["ssam"] and res["ssam"]["weights"].endswith("best_model.pt")
    assert "landscape_1d" not in res["ssam"] and "sharpness" not in res["ssam"]
    # One run directory: the report goes into it.
    assert main(["analyze", str(runs / "sgd"), "--points", "0", "--top-k", "0", "--quiet"]) == 0
    assert (runs / "sgd" / "analysis" / "results.json").is_file()
    # Two runs: into the folder that holds both; and the command says where it wrote
    capsys.readouterr()
    assert main(["analyze", str(runs / "sgd"), str(runs / "ssam"), "--points", "0", "--top-k", "0"]) == 0
    assert sorted(json.loads((runs / "analysis" / "results.json").read_text())) == ["sgd", "ssam"]
    assert f"wrote {runs / 'analysis'}: results.json, summary.md" in capsys.readouterr().err
    assert not (tmp_path / "analysis").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/nonexistent/run"], "/nonexistent/run: no such file or directory"),
        (["--batch-size", "0", "X"], "must be > 0, got '0'"),
        (["--points", "1", "RUNS"], "at least 2 points"),
        (["--formats", "gif", "RUNS"], "--format 'gif'"),
        (["EMPTY"], "no run directories"),
    ],
)
def test_user_errors_name_the_value(runs, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [str(runs) if a == "RUNS" else str(tmp_path / "empty") if a == "EMPTY" else a for a in argv]
    assert main(["analyze", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["analyze", str(bad)]) == 2
    assert "not a readable sparsam checkpoint" in capsys.readouterr().err


def test_figures_take_each_runs_method_style(runs, tmp_path, monkeypatch):
    """The landscape, training-curve, spectrum and mask-density figures colour and name each run by its
    method, as the report does."""
    from sparsam.analysis import plots
    from sparsam.runs.figures import method_style

    seen: dict[str, dict] = {}
    figures = ("plot_landscape_1d", "plot_training_curves", "plot_spectra", "plot_mask_density")
    for fn in figures:
        real = getattr(plots, fn)

        def spy(*args, _real=real, _fn=fn, **kwargs):
            seen[_fn] = dict(kwargs.get("styles") or {})
            return _real(*args, **kwargs)

        monkeypatch.setattr(plots, fn, spy)
    out = tmp_path / "s"
    argv = ["analyze", str(runs / "sgd"), str(runs / "ssam"), "--out", str(out), "--points", "3", "--eig-iters", "4"]
    assert main([*argv, "--rho", "0", "--formats", "png", "--quiet"]) == 0
    expect = {
        name: method_style(json.loads((runs / name / "config.json").read_text())["config"]) for name in ("sgd", "ssam")
    }
    for fn in figures:
        assert {k: (v.color, v.label) for k, v in seen[fn].items()} == {
            k: (v.color, v.label) for k, v in expect.items()
        }
    assert seen["plot_landscape_1d"]["sgd"].label == "SGD" and seen["plot_landscape_1d"]["ssam"].label == "SSAM-F, 50%"
