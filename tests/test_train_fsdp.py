"""``sparsam train --fsdp`` under torchrun: two gloo processes on 127.0.0.1, the model sharded by FSDP2.

The reference is the same run under DDP with ``--ascent sync``: SmallCNN has BatchNorm, whose batch
statistics are per process, so one process on the whole batch is a different computation; DDP with
the all-reduced ascent is the same one (every rank's gradient averaged in both passes, BatchNorm
on each rank's half). The test images split 26/25 over the ranks and are evaluated 5 at a time, so
the ranks run different numbers of evaluation batches (FSDP's forwards must still pair up). The
FSDP run stops after epoch 1 (--stop-after) and resumes from its checkpoint, so the test also
checks that checkpoints of sharded runs hold the full weights, masks and momentum, and that a
resumed run continues as the uninterrupted one. The masks are SSAM-F's (made before step 0 and again
at step 2, the first step of epoch 2): under DDP rank 0's Fisher, broadcast; under FSDP per-shard
Fisher scores of rank 0's samples and running statistics, chosen by the distributed threshold.
Pass 1 uses the first half of each rank's batch (``--ascent-fraction 0.5``) and ρ is ramped over
the first 2 of the 4 steps (``--rho-ramp 0.5``). Random masks under FSDP2 and ``--sam-every``'s
schedule are tested in ``tests/test_fsdp.py``.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import torch.distributed as dist

from .launch import torchrun_sparsam

from sparsam.train.config import TrainConfig, validate
from sparsam.train.errors import ConfigError

COMMON = [
    "--opt",
    "ssam",
    "--mask",
    "fisher",
    "--num-samples",
    "16",
    "--sparsity",
    "0.5",
    "--mask-update-epochs",
    "1",
    "--rho",
    "0.5",
    "--ascent",
    "sync",
    "--ascent-fraction",  # pass 1 on the first half of each rank's batch, rho ramped over 2 of the 4 steps
    "0.5",
    "--rho-ramp",
    "0.5",
    "--train-subset",
    "128",
    "--test-subset",
    "51",
    "--batch-size",
    "64",
    "--epochs",
    "2",
    "--width",
    "4",
    "--threads",
    "1",
    "--no-progress",
    "--eval-batch-size",
    "5",
]


def _torchrun(*args: str) -> subprocess.CompletedProcess[str]:
    return torchrun_sparsam("train", *args)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp_two_ranks_equal_ddp_and_resume(tmp_path):
    pytest.importorskip("sklearn")
    fsdp = pytest.importorskip("torch.distributed.fsdp")
    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard")
    ddp_out, fsdp_out = tmp_path / "ddp", tmp_path / "fsdp"
    _torchrun(*COMMON, "--out", str(ddp_out))
    first = _torchrun(*COMMON, "--fsdp", "--stop-after", "1", "--out", str(fsdp_out))
    assert "with parameters sharded by FSDP2" in first.stderr
    _torchrun("--resume", str(fsdp_out))  # the saved config carries --fsdp
    a = torch.load(ddp_out / "checkpoint.pt", weights_only=True)
    b = torch.load(fsdp_out / "checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and b["config"]["fsdp"]
    # full tensors in the checkpoint (not this rank's shard), equal to the DDP run's
    assert a["model"].keys() == b["model"].keys()
    for k, v in a["model"].items():
        assert type(b["model"][k]) is torch.Tensor and b["model"][k].shape == v.shape, k
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for i, st in a["optimizer"]["state"].items():
        torch.testing.assert_close(
            b["optimizer"]["state"][i]["momentum_buffer"], st["momentum_buffer"], rtol=1e-5, atol=1e-6
        )
    # the masks joined from the shards are DDP's (a sharded run saves all-False masks where none is set)
    ma, mb = a["optimizer"]["sparsam"]["masks"], b["optimizer"]["sparsam"]["masks"]
    assert ma and set(ma) <= set(mb)
    for i, m in mb.items():
        assert torch.equal(m, ma.get(i, torch.zeros_like(m))), i
    best = torch.load(fsdp_out / "best_model.pt", weights_only=True)
    assert (
        type(best["model"]["fc.weight"]) is torch.Tensor
        and best["model"]["fc.weight"].shape == a["model"]["fc.weight"].shape
    )
    rows_a = [json.loads(x) for x in (ddp_out / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (fsdp_out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows_b] == [64, 64]  # the logged loss is pass 1's: half of each batch
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ("train_loss", "test_loss", "test_acc", "mask_density"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5), key


@pytest.mark.parametrize(
    "flags, words",
    [
        (
            {"opt": "ssam", "mask": "fisher", "ascent": "sync", "pattern": "structured"},
            "needs --granularity channel",
        ),
        ({"opt": "sam", "ascent": "local"}, "--fsdp needs --ascent sync"),
        ({"opt": "looksam", "ascent": "sync"}, "--fsdp supports --opt sgd, sam, asam and ssam"),
        ({"opt": "sam", "ascent": "sync", "compile": True}, "--compile"),
        ({"opt": "ssam", "mask": "random", "ascent": "sync", "norm": "masked"}, "--no-sparse-ascent"),
        ({"opt": "ssam", "mask": "random", "ascent": "sync", "form": "implicit"}, "--form explicit only"),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(flags, words):
    with pytest.raises(ConfigError, match="--fsdp") as e:
        validate(TrainConfig(fsdp=True, **flags))
    assert words in str(e.value) and "\n" not in str(e.value)
    validate(TrainConfig(**flags))  # the same settings without --fsdp are fine


def test_fsdp_accepts_its_methods():
    for flags in (
        {"opt": "sgd"},
        {"opt": "sam", "ascent": "sync"},
        {"opt": "asam", "ascent": "sync"},
        {"opt": "ssam", "mask": "random", "ascent": "sync"},
        {"opt": "ssam", "mask": "random", "ascent": "sync", "norm": "masked", "sparse_ascent": False},
        {"opt": "ssam", "mask": "fisher", "ascent": "sync"},
        {"opt": "ssam", "mask": "fisher", "ascent": "sync", "pattern": "structured", "granularity": "channel"},
        {"opt": "ssam", "mask": "dynamic", "ascent": "sync"},
        {"opt": "ssam", "mask": "norm", "ascent": "sync"},
        {"opt": "sam", "ascent": "sync", "sam_every": 2, "sam_start": 0.5, "rho_ramp": 0.25},
        {"opt": "ssam", "mask": "fisher", "ascent": "sync", "ascent_fraction": 0.5},
    ):
        assert validate(TrainConfig(fsdp=True, **flags)).fsdp


def test_fsdp_makes_ascent_sync_the_default_and_refuses_an_explicit_local(capsys):
    from sparsam.__main__ import main
    from sparsam.train.config import build_config

    assert build_config([("cli", {"fsdp": True, "opt": "sam"})]).ascent == "sync"
    assert build_config([("cli", {"opt": "sam"})]).ascent == "local"  # DDP keeps its default
    # a config file or saved config that says local is explicit, as a flag is
    with pytest.raises(ConfigError, match="--fsdp needs --ascent sync .its default., got --ascent local"):
        build_config([("config file", {"ascent": "local"}), ("cli", {"fsdp": True, "opt": "sam"})])
    assert main(["train", "--fsdp", "--opt", "sam", "--ascent", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fsdp needs --ascent sync" in err


def test_fsdp_cli_error_is_one_line(capsys):
    from sparsam.__main__ import main

    assert main(["train", "--fsdp", "--opt", "looksam", "--ascent", "sync"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--fsdp supports --opt sgd, sam, asam and ssam" in err
