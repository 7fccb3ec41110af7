"""Robustness at the data level: one-class and empty class folders, damaged image files."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsam.data import DamagedImageError, ImageFolderStream, ResizeCenterCrop, load_dataset

Image = pytest.importorskip("PIL.Image")


def _jpeg(path: Path, seed: int, size=(8, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def make_folder(root: Path, classes=("a", "b"), n=(3, 2)) -> None:
    for split, count in (("train", n[0]), ("test", n[1])):
        for ci, c in enumerate(classes):
            for i in range(count):
                _jpeg(root / split / c / f"{i:03d}.jpg", seed=100 * ci + i + (50 if split == "test" else 0))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ---------------------------------------------------------------- one-class and empty class folders
def test_a_one_class_folder_is_refused(tmp_path):
    make_folder(tmp_path, classes=("only",))
    with pytest.raises(ValueError, match="at least two classes"):
        load_dataset(tmp_path, cache=False)
    with pytest.raises(ValueError, match="at least two classes"):
        ImageFolderStream(tmp_path, transform=ResizeCenterCrop(8, resize=8))


def test_two_class_folders_of_which_one_is_empty_are_refused(tmp_path):
    make_folder(tmp_path, classes=("a",))
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(ValueError, match=r"a \(3 images\), b \(0 images\)"):
        load_dataset(tmp_path, cache=False)


def test_a_class_folder_without_train_images_warns(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    (tmp_path / "train" / "c").mkdir()
    _jpeg(tmp_path / "test" / "c" / "0.jpg", seed=9)
    with pytest.warns(UserWarning, match=r"class folder\(s\) c of .*train hold no image files"):
        s = load_dataset(tmp_path, cache=False)
    assert s.num_classes == 3 and s.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.warns(UserWarning, match="hold no image files"):
        ImageFolderStream(tmp_path, transform=ResizeCenterCrop(8, resize=8))


# ------------------------------------------------------------------------------ damaged image files
@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_jpeg_is_named_in_one_line(tmp_path, workers):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "b" / "001.jpg"
    truncate(bad)
    with pytest.raises(DamagedImageError) as info:
        load_dataset(tmp_path, cache=False, num_workers=workers)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "skip_damaged" in msg and "Traceback" not in msg
    assert [p for p, _ in info.value.files] == [str(bad)]


def test_damaged_files_are_counted(tmp_path):
    make_folder(tmp_path)
    for rel in ("train/a/000.jpg", "test/b/001.jpg"):
        truncate(tmp_path / rel)
    (tmp_path / "train" / "b" / "002.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DamagedImageError, match="3 damaged image files"):
        load_dataset(tmp_path, cache=False)


def test_skip_damaged_leaves_them_out_with_a_count(tmp_path):
    make_folder(tmp_path)
    truncate(tmp_path / "train" / "a" / "001.jpg")
    truncate(tmp_path / "test" / "b" / "000.jpg")
    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="skipped 2 damaged image file"):
        s = load_dataset(tmp_path, cache_dir=cache, skip_damaged=True)
    assert s.train.labels.tolist() == [0, 0, 1, 1, 1] and s.test.labels.tolist() == [0, 0, 1]
    # the pixels of the kept files are those of the files (not shifted by the skipped one)
    ref = np.array(Image.open(tmp_path / "train" / "a" / "002.jpg").convert("RGB"))
    assert torch.equal(s.train.images[1], torch.from_numpy(ref).permute(2, 0, 1))
    # the cache entry remembers what it left out: without skip_damaged it is still refused
    with pytest.raises(DamagedImageError, match="001.jpg"):
        load_dataset(tmp_path, cache_dir=cache)
    with pytest.warns(UserWarning, match="skipped 2"):
        again = load_dataset(tmp_path, cache_dir=cache, skip_damaged=True)
    assert torch.equal(again.train.images, s.train.images)


def test_stream_names_a_damaged_file_also_from_a_worker(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "a" / "001.jpg"
    truncate(bad)
    ds = ImageFolderStream(tmp_path, transform=ResizeCenterCrop(8, resize=8))
    with pytest.raises(DamagedImageError, match="001.jpg"):
        ds[1]
    loader = torch.utils.data.DataLoader(ds, batch_size=6, num_workers=1)
    with pytest.raises(DamagedImageError) as info:
        next(iter(loader))
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "Traceback" not in msg
    skipping = ImageFolderStream(tmp_path, transform=ResizeCenterCrop(8, resize=8), skip_damaged=True)
    with pytest.warns(UserWarning, match="skipping damaged image file .*001.jpg"):
        x, y = skipping[1]
    assert torch.equal(x, skipping[2][0]) and y == 0  # replaced by the next readable file
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skipping[0]


def test_the_cli_names_a_damaged_file_in_one_line_or_skips_it(tmp_path, capsys):
    from sparsam.__main__ import main

    data = tmp_path / "folder"
    make_folder(data, n=(4, 2))
    bad = data / "train" / "b" / "002.jpg"
    truncate(bad)
    common = [
        "train",
        "--data",
        str(data),
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--workers",
        "2",
        "--no-progress",
        "--augment",
        "none",
    ]
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "r1")]) == 2
    # the once-per-process notice of where decoded images are cached may come first (order of tests)
    err = "\n".join(
        line for line in capsys.readouterr().err.strip().splitlines() if "decoded images are cached" not in line
    )
    assert len(err.splitlines()) == 1 and str(bad) in err and "--skip-damaged" in err and "Traceback" not in err
    with pytest.warns(UserWarning, match="skipped 1 damaged image file"):
        assert main([*common, "--skip-damaged", "--out", str(tmp_path / "r2")]) == 0
    saved = __import__("json").loads((tmp_path / "r2" / "config.json").read_text())
    assert saved["config"]["skip_damaged"] is True and saved["data"]["train_size"] == 7
    capsys.readouterr()
    stream = [*common, "--folder-mode", "stream", "--image-size", "8"]
    assert main([*stream, "--out", str(tmp_path / "r3")]) == 2  # found by a DataLoader worker mid-epoch
    err = capsys.readouterr().err.strip()
    errors = [ln for ln in err.splitlines() if "error" in ln]  # the other line: "training sgd on ..."
    assert len(errors) == 1 and str(bad) in errors[0] and "Traceback" not in err, err
    with pytest.warns(UserWarning, match="skipping damaged image file"):
        assert main([*stream, "--workers", "0", "--skip-damaged", "--out", str(tmp_path / "r4")]) == 0
