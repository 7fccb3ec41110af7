"""The training engine end to end on tiny runs: every optimizer, the run directory, BatchNorm from
the clean pass only, accumulation, the schedule, and the seams (AMP, clipping)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsam.train import build_config, train
from sparsam.train.config import TrainConfig
from sparsam.train.build import WarmupCosine

pytest.importorskip("sklearn")  # the digits data set

# 256 training digits in batches of 64: 4 steps per epoch; 90 test digits.
TINY = {
    "data": "digits",
    "train_subset": 256,
    "test_subset": 90,
    "batch_size": 64,
    "epochs": 1,
    "threads": 1,
    "progress": False,
}


def tiny(out, **over):
    return build_config([("test", {**TINY, "out": str(out), **over})])


def run(out, **over):
    return train(tiny(out, **over), quiet=True)


def final_model(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


OPTIMIZERS = {
    "sgd": {"opt": "sgd"},
    "sam": {"opt": "sam", "rho": 0.5},
    "asam": {"opt": "asam", "rho": 2.0},
    "ssam-random": {"opt": "ssam", "mask": "random", "rho": 0.5},
    "ssam-fisher": {"opt": "ssam", "mask": "fisher", "rho": 0.5, "num_samples": 32},
    "ssam-dynamic": {"opt": "ssam", "mask": "dynamic", "rho": 0.5},
    "ssam-norm": {"opt": "ssam", "mask": "norm", "rho": 0.5},
    "ssam-nm": {"opt": "ssam", "mask": "fisher", "pattern": "nm", "nm": "2:4", "rho": 0.5, "num_samples": 32},
    "ssam-structured": {
        "opt": "ssam",
        "mask": "random",
        "pattern": "structured",
        "granularity": "channel",
        "norm": "masked",
        "rho": 0.5,
    },
    "ssam-implicit": {"opt": "ssam", "mask": "random", "form": "implicit", "rho": 0.5},
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("opts")
    results = {name: (root / name, run(root / name, **over)) for name, over in OPTIMIZERS.items()}
    return results


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_optimizer_trains_end_to_end(runs, name):
    out, result = runs[name]
    assert result.finished and result.stopped is None and result.epochs_done == 1
    rows = metrics(out)
    assert len(rows) == 1
    row = rows[0]
    for key in ("epoch", "train_loss", "test_acc", "epoch_time_s", "train_acc", "test_loss", "lr", "time_s"):
        assert key in row, key
    assert 0.0 <= row["test_acc"] <= 1.0 and 0.0 <= row["train_acc"] <= 1.0
    assert math.isfinite(row["train_loss"]) and row["train_samples"] == 256
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] == row["test_acc"] == summary["best_test_acc"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["opt"] == OPTIMIZERS[name]["opt"]
    assert meta["sparsam_version"] and "git_commit" in meta  # the commit may be null outside a checkout
    assert meta["data"]["train_size"] == 256 and meta["data"]["steps_per_epoch"] == 4
    if name != "sgd":  # the optimizer really took part: the weights differ from plain SGD's
        sgd = final_model(runs["sgd"][0])
        mine = final_model(out)
        assert any(not torch.equal(sgd[k], mine[k]) for k in sgd if k.endswith("weight"))


@pytest.mark.parametrize("name", ["ssam-random", "ssam-fisher", "ssam-dynamic"])
def test_ssam_logs_mask_density(runs, name):
    row = metrics(runs[name][0])[0]
    assert row["mask_density"] == pytest.approx(0.5, abs=0.01)


def test_nm_mask_density_follows_the_pattern(runs):
    # 2:4 on every weight matrix; 1-D tensors are perturbed whole (the authors' N:M policy)
    assert 0.5 <= metrics(runs["ssam-nm"][0])[0]["mask_density"] < 0.6


def test_batchnorm_statistics_come_from_the_clean_pass_only(runs):
    for name in ("sgd", "sam", "ssam-fisher"):
        model = final_model(runs[name][0])
        # 4 steps: one BatchNorm update per step, not two (SAM's second pass must not count)
        assert int(model["bn1.num_batches_tracked"]) == 4, name


def test_accumulation_runs_micro_batches_in_both_passes(tmp_path):
    run(tmp_path / "acc", opt="sam", accum=2)
    model = final_model(tmp_path / "acc")
    # 4 steps x 2 micro-batches in the clean pass; the perturbed pass adds none
    assert int(model["bn1.num_batches_tracked"]) == 8


def test_seed_fixes_the_run_and_changes_it(tmp_path):
    run(tmp_path / "a", opt="sam")
    run(tmp_path / "b", opt="sam")
    run(tmp_path / "c", opt="sam", seed=1)
    a, b, c = (final_model(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    "over",
    [
        {"amp": "bf16"},
        {"amp": "fp16"},
        {"clip": 0.5},
        {"base": "adamw", "lr": 1e-3},
        {"label_smoothing": 0.1, "warmup_epochs": 0.5, "nesterov": True},
    ],
)
def test_engine_options(tmp_path, over):
    result = run(tmp_path / "r", opt="sam", **over)
    assert result.finished
    assert math.isfinite(metrics(tmp_path / "r")[0]["train_loss"])


def test_fp16_saves_the_grad_scaler(tmp_path):
    run(tmp_path / "r", opt="ssam", mask="random", amp="fp16")
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)
    assert ckpt["scaler"] is not None and ckpt["scaler"]["scale"] > 0


def test_schedule_is_per_step_cosine_with_warmup():
    f = WarmupCosine(total_steps=10, warmup_steps=2, min_ratio=0.1, schedule="cosine")
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f(10) == pytest.approx(0.1)
    assert WarmupCosine(10, 0, 0.0, "constant")(7) == 1.0


def test_lr_logged_per_epoch_follows_the_schedule(tmp_path):
    run(tmp_path / "r", epochs=2, lr=0.1)
    rows = metrics(tmp_path / "r")
    # lr of each epoch's first step: 0.1 at step 0, cosine at step 4 of 8 = 0.05
    assert rows[0]["lr"] == pytest.approx(0.1) and rows[1]["lr"] == pytest.approx(0.05)
    assert rows[1]["time_s"] == pytest.approx(rows[0]["epoch_time_s"] + rows[1]["epoch_time_s"])


def test_result_reports_final_and_best(tmp_path):
    result = run(tmp_path / "r", epochs=2)
    rows = metrics(tmp_path / "r")
    assert result.final_test_acc == rows[-1]["test_acc"]
    assert result.best_test_acc == max(r["test_acc"] for r in rows)
    assert torch.load(tmp_path / "r" / "best_model.pt", weights_only=True)["epoch"] == result.best_epoch


def test_default_run_directory_name():
    cfg = TrainConfig(opt="ssam", mask="dynamic", sparsity=0.9, seed=2)
    assert cfg.default_out().endswith("digits-smallcnn-ssam-d-s0.9-seed2")


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch, capsys):
    pytest.importorskip("tqdm")
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    train(tiny(tmp_path / "r", log_every=1, progress=True))
    err = capsys.readouterr().err
    assert "loss=" in err and "acc=" in err and "img_s=" in err  # the bar's postfix
    assert "epoch 1/1  train_loss" in err  # and the per-epoch line


def test_no_progress_bar_when_not_a_terminal(tmp_path, capsys):
    train(tiny(tmp_path / "r", log_every=1, progress=True))
    err = capsys.readouterr().err
    assert "img_s=" not in err and "epoch 1/1  train_loss" in err


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    from sparsam.__main__ import main

    assert main(["train", "--tensorboard", "--out", str(tmp_path / "r")]) == 2
    assert "--tensorboard needs the tensorboard package" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_test_epochs_skips_evaluation_without_changing_training(tmp_path):
    """--test-epochs 2 (of 3) evaluates after epochs 2 and 3 only: epoch 1's test numbers are null,
    the weights equal a run that evaluates every epoch bit for bit (and after a resume across the
    skipped epoch), and the best epoch is chosen among the evaluated ones."""
    every = run(tmp_path / "every", opt="sam", rho=0.5, epochs=3)
    some = run(tmp_path / "some", opt="sam", rho=0.5, epochs=3, test_epochs="2")
    run(tmp_path / "resumed", opt="sam", rho=0.5, epochs=3, test_epochs="2", stop_after=1)
    train(tiny(tmp_path / "resumed", opt="sam", rho=0.5, epochs=3, test_epochs="2"), resume=True, quiet=True)
    rows_every, rows_some = metrics(tmp_path / "every"), metrics(tmp_path / "some")
    assert [r["test_acc"] is None for r in rows_some] == [True, False, False]
    assert rows_some[0]["test_loss"] is None
    assert [r["test_acc"] for r in rows_some[1:]] == [r["test_acc"] for r in rows_every[1:]]
    assert [r["train_loss"] for r in rows_some] == [r["train_loss"] for r in rows_every]
    for other in ("some", "resumed"):
        w = final_model(tmp_path / other)
        for k, v in final_model(tmp_path / "every").items():
            assert torch.equal(w[k], v), (other, k)
    assert some.final_test_acc == every.final_test_acc
    best = max(rows_some[1:], key=lambda r: r["test_acc"])
    assert (some.best_test_acc, some.best_epoch) == (best["test_acc"], best["epoch"])


@pytest.mark.parametrize("spec", ["0", "4", "two", "1,,x"])
def test_test_epochs_refuses_a_bad_list(tmp_path, spec):
    from sparsam.train import ConfigError

    with pytest.raises(ConfigError, match="--test-epochs"):
        run(tmp_path / "bad", epochs=3, test_epochs=spec)
