"""Checkpoints: resume is bit-exact (at an epoch boundary and after Ctrl-C mid-epoch), damaged or
foreign checkpoints are refused without being touched, and run directories are not overwritten."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from sparsam.__main__ import main
from sparsam.train import CheckpointError, RunDirError, train
from sparsam.runs.checkpoint import load_checkpoint

from .test_train_engine import metrics, tiny

pytest.importorskip("sklearn")

# SSAM-F with augmentation: exercises model, momentum, masks, the mask source's RNG, the LR
# schedule, loader order and augmentation streams.
RESUMABLE = {"opt": "ssam", "mask": "fisher", "num_samples": 32, "rho": 0.5, "augment": "flip", "epochs": 2}


def weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def assert_same_state(a, b):
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]), i
    ma, mb = a["optimizer"]["sparsam"]["masks"], b["optimizer"]["sparsam"]["masks"]
    assert ma.keys() == mb.keys() and all(torch.equal(ma[i], mb[i]) for i in ma)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(tiny(out, **RESUMABLE), quiet=True)
    return out


def test_resume_at_epoch_boundary_is_bitwise_identical(straight, tmp_path):
    out = tmp_path / "split"
    first = train(tiny(out, stop_after=1, **RESUMABLE), quiet=True)
    assert first.stopped == "stop_after" and not first.finished and first.epochs_done == 1
    assert not (out / "summary.json").exists()
    second = train(tiny(out, **RESUMABLE), resume=True, quiet=True)
    assert second.finished and second.epochs_done == 2
    assert_same_state(weights(straight), weights(out))
    a, b = metrics(straight), metrics(out)
    assert [r["epoch"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "mask_density"):
            assert ra[key] == rb[key], key


def test_ctrl_c_mid_epoch_saves_and_resumes_bitwise(straight, tmp_path, capsys):
    out = tmp_path / "interrupted"

    def press_ctrl_c(step):
        if step == 3:  # in the middle of the first epoch (4 steps)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    first = train(tiny(out, **RESUMABLE), on_step=press_ctrl_c)
    assert first.stopped == "interrupted" and not first.finished
    err = capsys.readouterr().err
    assert "SIGINT received" in err and "--resume" in err
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["epoch"] == 0 and ckpt["partial"]["step_in_epoch"] == 3 and ckpt["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    train(tiny(out, **RESUMABLE), resume=True, quiet=True)
    assert_same_state(weights(straight), weights(out))
    a, b = metrics(straight), metrics(out)
    assert [(r["train_loss"], r["train_acc"], r["test_acc"]) for r in a] == [
        (r["train_loss"], r["train_acc"], r["test_acc"]) for r in b
    ]
    # the interrupted epoch's time is counted once: cumulative time = sum of the epochs' times
    assert b[-1]["time_s"] == pytest.approx(sum(r["epoch_time_s"] for r in b))


def test_truncated_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "t"
    train(tiny(out, stop_after=1, **RESUMABLE), quiet=True)
    path = out / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        train(tiny(out, **RESUMABLE), resume=True, quiet=True)
    assert path.read_bytes() == data[: len(data) // 2]
    assert main(["train", "--resume", str(out)]) == 2  # the command line: one clear line, status 2
    err = capsys.readouterr().err
    assert f"checkpoint {path} is truncated or corrupted" in err and "Traceback" not in err
    with pytest.raises(RunDirError, match="--resume"):  # nor may a fresh run replace it
        train(tiny(out, **RESUMABLE), quiet=True)
    assert path.read_bytes() == data[: len(data) // 2]


def test_mismatched_config_is_refused(tmp_path):
    out = tmp_path / "m"
    train(tiny(out, stop_after=1, **RESUMABLE), quiet=True)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"--model: saved 'smallcnn', now 'resnet18'"):
        train(tiny(out, **{**RESUMABLE, "model": "resnet18", "width": 4}), resume=True, quiet=True)
    with pytest.raises(CheckpointError, match=r"--mask: saved 'fisher', now 'dynamic'"):
        train(tiny(out, **{**RESUMABLE, "mask": "dynamic"}), resume=True, quiet=True)
    assert (out / "checkpoint.pt").read_bytes() == before


def test_checkpoint_of_another_model_is_refused(tmp_path):
    # config.json and checkpoint.pt disagree: a checkpoint copied in from another run
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(a, stop_after=1, **RESUMABLE), quiet=True)
    train(tiny(b, stop_after=1, **{**RESUMABLE, "model": "resnet18", "width": 4}), quiet=True)
    (a / "checkpoint.pt").write_bytes((b / "checkpoint.pt").read_bytes())
    with pytest.raises(CheckpointError, match="--model"):
        train(tiny(a, **RESUMABLE), resume=True, quiet=True)


def test_run_directory_is_not_overwritten(tmp_path):
    out = tmp_path / "r"
    train(tiny(out), quiet=True)
    with pytest.raises(RunDirError, match="already holds a finished run.*--resume.*--overwrite"):
        train(tiny(out), quiet=True)
    assert train(tiny(out), overwrite=True, quiet=True).finished
    # resuming a finished run is a no-op that reports its numbers
    again = train(tiny(out), resume=True, quiet=True)
    assert again.finished and again.final_test_acc == metrics(out)[-1]["test_acc"]
    with pytest.raises(RunDirError, match="no run to resume"):
        train(tiny(tmp_path / "empty"), resume=True, quiet=True)


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(tiny(out, stop_after=1, **RESUMABLE), quiet=True)
    good = (out / "checkpoint.pt").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        train(tiny(out, **RESUMABLE), resume=True, quiet=True)
    assert (out / "checkpoint.pt").read_bytes() == good  # the old checkpoint survives a failed write
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
