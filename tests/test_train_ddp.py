"""``sparsam train`` under torchrun: two gloo processes on 127.0.0.1.

With SPARSAM_DEBUG_RANK_DUMP=1 every rank saves, at the end, its own weights, masks and which
training samples it drew. The test checks that the ranks drew disjoint halves of the data, that they
nevertheless end with bit-identical weights, buffers and SSAM masks, that rank 0's checkpoint holds
exactly those weights, and that the logged metrics count the samples of both ranks.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from .launch import torchrun_sparsam

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_torchrun_two_ranks_end_identical(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "ddp"
    torchrun_sparsam(
        "train",
        "--opt",
        "ssam",
        "--mask",
        "random",
        "--mask-update-epochs",
        "1",
        "--rho",
        "0.5",
        "--train-subset",
        "256",
        "--test-subset",
        "90",
        "--batch-size",
        "64",
        "--epochs",
        "2",
        "--threads",
        "1",
        "--no-progress",
        "--out",
        str(out),
        env={"SPARSAM_DEBUG_RANK_DUMP": "1"},
    )
    r0, r1 = (torch.load(out / "debug" / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["world_size"] == r1["world_size"] == 2
    # each rank trained on its own half: disjoint shards of 128 of the 256 training images
    s0, s1 = set(r0["shard_epoch0"].tolist()), set(r1["shard_epoch0"].tolist())
    assert len(s0) == len(s1) == 128 and not s0 & s1
    assert r0["samples_seen"] == r1["samples_seen"] == 2 * 128
    # ... and still ended bit-identical (parameters, BatchNorm buffers, masks)
    assert r0["model"].keys() == r1["model"].keys()
    for k in r0["model"]:
        assert torch.equal(r0["model"][k], r1["model"][k]), k
    assert r0["digest"] == r1["digest"]
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], r0["model"][k]) for k in r0["model"])
    # metrics are reduced over ranks: both halves counted, test set evaluated once in full
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_samples"] for r in rows] == [256, 256]
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    assert rows[-1]["test_acc"] * 90 == pytest.approx(round(rows[-1]["test_acc"] * 90))
