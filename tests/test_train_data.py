"""The CLI's data paths: CIFAR in the official pickle format, image folders (in memory and
streamed, grayscale and RGB), the shared CIFAR-10 JPEG copy, and seeded subsets."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

from sparsam.__main__ import main
from sparsam.train import build_config, train
from sparsam.train.loaders import choose_subset

from .test_train_engine import metrics


def _write_cifar10(root, per_batch=20, test=30, seed=0):
    """Small files in the official CIFAR-10 python format (Python-2 style bytes keys)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def batch(n, name):
        d = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"filenames": [b"x.png"] * n,
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    for i in range(1, 6):
        batch(per_batch, f"data_batch_{i}")
    batch(test, "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch}, f, protocol=2)


def test_cifar_official_pickles_through_the_cli(tmp_path, capsys):
    _write_cifar10(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            "cifar10",
            "--data-root",
            str(tmp_path / "data"),
            "--model",
            "smallcnn",
            "--width",
            "4",
            "--opt",
            "ssam",
            "--mask",
            "dynamic",
            "--epochs",
            "1",
            "--batch-size",
            "25",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "config.json").read_text())["data"]
    assert meta["train_size"] == 100 and meta["test_size"] == 30 and meta["in_channels"] == 3
    assert meta["image_size"] == [32, 32] and meta["augment"] == "cifar"  # crop + flip + Cutout by default
    assert metrics(out)[0]["steps"] == 4


def test_missing_cifar_says_where_to_put_the_files(tmp_path, capsys):
    rc = main(["train", "--data", "cifar100", "--data-root", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "cifar-100-python" in err and "--download" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing written: the directory is free for the next try


def _image_folder(root, *, size, mode, per_class=6, classes=3):
    from PIL import Image

    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(per_class):
                shape = (size, size) if mode == "L" else (size, size, 3)
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(d / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "mode, size, folder_mode, channels",
    [("L", 12, "auto", 1), ("RGB", 10, "memory", 3), ("RGB", 80, "auto", 3), ("L", 40, "stream", 1)],
)
def test_image_folder_any_size_gray_or_rgb(tmp_path, mode, size, folder_mode, channels):
    data = _image_folder(tmp_path / "imgs", size=size, mode=mode)
    cfg = build_config(
        [
            (
                "t",
                {
                    "data": str(data),
                    "model": "smallcnn",
                    "width": 4,
                    "epochs": 1,
                    "batch_size": 6,
                    "folder_mode": folder_mode,
                    "image_size": 16,
                    "workers": 0,
                    "threads": 1,
                    "opt": "sam",
                    "out": str(tmp_path / "run"),
                },
            )
        ]
    )
    assert train(cfg, quiet=True).finished
    meta = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert meta["in_channels"] == channels and meta["train_size"] == 18 and meta["test_size"] == 18
    expected_mode = "stream" if folder_mode == "stream" or size > 64 else "memory"
    assert meta["mode"] == expected_mode
    assert meta["image_size"] == ([16, 16] if expected_mode == "stream" else [size, size])


def test_shared_cifar10_jpeg_folder_with_a_subset(shared_data_dir, tmp_path):
    folder = f"{shared_data_dir}/cifar10-jpeg"
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            folder,
            "--train-subset",
            "60",
            "--test-subset",
            "40",
            "--model",
            "smallcnn",
            "--width",
            "4",
            "--epochs",
            "1",
            "--batch-size",
            "20",
            "--opt",
            "ssam",
            "--mask",
            "fisher",
            "--num-samples",
            "8",
            "--threads",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["data"]["train_size"] == 60 and meta["data"]["test_size"] == 40
    assert meta["data"]["num_classes"] == 10 and meta["data"]["in_channels"] == 3 and meta["data"]["mode"] == "memory"
    assert meta["config"]["data"] == folder


def test_balanced_subset_is_seeded_and_balanced():
    labels = np.repeat(np.arange(4), [50, 50, 50, 3])  # class 3 is short
    a = choose_subset(labels, 40, "balanced", 0, what="train")
    assert len(a) == 40 and len(set(a.tolist())) == 40
    counts = np.bincount(labels[a], minlength=4)
    assert counts[3] == 3 and counts[:3].min() >= 10  # the short class gives all it has
    assert np.array_equal(a, choose_subset(labels, 40, "balanced", 0, what="train"))
    assert not np.array_equal(a, choose_subset(labels, 40, "balanced", 1, what="train"))
    even = choose_subset(np.repeat(np.arange(4), 50), 40, "balanced", 3, what="train")
    assert np.bincount(np.repeat(np.arange(4), 50)[even]).tolist() == [10, 10, 10, 10]
    r = choose_subset(labels, 40, "random", 0, what="train")
    assert len(r) == 40 and not np.array_equal(r, a)


def test_subset_larger_than_the_data_is_an_error(tmp_path, capsys):
    pytest.importorskip("sklearn")
    rc = main(["train", "--train-subset", "5000", "--out", str(tmp_path / "r")])
    assert rc == 2 and "--train-subset 5000 is larger than the train set (1437 images)" in capsys.readouterr().err


def test_fisher_samples_come_without_augmentation(tmp_path):
    pytest.importorskip("sklearn")
    from sparsam.train.config import TrainConfig
    from sparsam.train.loaders import build_data

    cfg = TrainConfig(data="digits", augment="cifar", train_subset=100)
    data = build_data(cfg, device=torch.device("cpu"), batch_per_rank=20)
    assert data.train.augment is not None and data.fisher.augment is None
    data.fisher.set_epoch(3)
    first = next(iter(data.fisher))[0]
    data.fisher.set_epoch(3)
    assert torch.equal(first, next(iter(data.fisher))[0])  # same samples for the same epoch
