"""Tests of sparsam.data: datasets, cache, device loader, batched augmentation, streaming."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsam.data import (
    ArrayDataset,
    DatasetNotFoundError,
    DeviceLoader,
    ImageFolderStream,
    RandomResizedCrop,
    ResizeCenterCrop,
    channel_stats,
    cifar_augment,
    cutout,
    folder_image_size,
    load_dataset,
    make_loaders,
    random_crop,
    random_flip,
    random_subset,
    subset_indices,
    to_device_batch,
)
from sparsam.data import cifar as cifar_mod
from sparsam.data import image_folder as folder_mod
from sparsam.data._files import safe_extract_tar

Image = pytest.importorskip("PIL.Image")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_dataset(n: int = 10, c: int = 3, h: int = 4, w: int = 4, classes: int = 3) -> ArrayDataset:
    g = gen(0)
    images = torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n) % classes)


# ================================================================= ArrayDataset and statistics


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="int64"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="3 vs 2"):
        ArrayDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64))
    ds = tiny_dataset()
    assert len(ds) == 10 and ds[3][1].item() == 0 and ds.to("cpu") is ds


def test_channel_stats_matches_direct_computation():
    ds = tiny_dataset(n=37, h=5, w=3)
    mean, std = channel_stats(ds.images, chunk=8)
    x = ds.images.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), x.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(torch.tensor(std, dtype=torch.float64), x.std(dim=(0, 2, 3), unbiased=False))


def test_random_subset():
    ds = tiny_dataset(n=40, classes=4)  # 10 per class
    bal = random_subset(ds, 10, seed=3)
    counts = np.bincount(bal.labels.numpy(), minlength=4)
    assert sorted(counts.tolist()) == [2, 2, 3, 3]
    assert torch.equal(bal.labels, random_subset(ds, 10, seed=3).labels)  # seeded
    # Kept in dataset order, and every sample is one of the dataset's.
    rows = [next(i for i in range(40) if torch.equal(ds.images[i], img)) for img in bal.images]
    assert rows == sorted(rows) and torch.equal(ds.labels[rows], bal.labels)
    rnd = random_subset(ds, 7, mode="random", seed=0)
    assert len(rnd) == 7
    with pytest.raises(ValueError, match="class"):
        random_subset(ArrayDataset(ds.images[:11], torch.tensor([1] + [0] * 10)), 8)  # class 1 has 1 < 4
    with pytest.raises(ValueError, match="41"):
        random_subset(ds, 41)
    with pytest.raises(ValueError, match="'even'"):
        random_subset(ds, 4, mode="even")


def test_subset_indices_draws_the_samples_runs_have_drawn():
    """The exact subsets of a fixed (labels, n, mode, seed): a run's --train-subset/--test-subset
    samples (and random_subset's) must not change from one version to the next."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 2, 1, 0, 0, 0])  # 9, 5 and 4 per class
    assert subset_indices(labels, 7, mode="balanced", seed=0).tolist() == [1, 5, 7, 8, 11, 13, 15]
    assert subset_indices(labels, 13, mode="balanced", seed=1).tolist() == [0, 1, 2, 4, 5, 7, 8, 9, 11, 12, 13, 14, 16]
    assert subset_indices(labels, 5, mode="random", seed=2).tolist() == [2, 6, 7, 10, 16]
    # 16 = 6 + 5 + 5 with class 2 holding 4: its shortfall comes from the other classes' rest ...
    filled = subset_indices(labels, 16, mode="balanced", seed=3)
    assert filled.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 14, 15, 16, 17]
    # ... or is an error without fill_short (random_subset's rule).
    with pytest.raises(ValueError, match="class 2, which has 4"):
        subset_indices(labels, 16, mode="balanced", seed=3, fill_short=False)
    assert len(subset_indices(labels, 0)) == 0


# ================================================================= digits


def test_digits_split_is_fixed_and_stratified():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    assert (len(s.train), len(s.test)) == (1437, 360)
    assert (s.num_classes, s.in_channels, s.image_size) == (10, 1, (8, 8))
    assert s.class_names == [str(i) for i in range(10)]
    assert s.train.images.shape == (1437, 1, 8, 8) and s.train.images.dtype == torch.uint8
    # Stratified: each class's test share is within one image of 360 * n_c / 1797.
    bunch = load_digits()
    counts = np.bincount(bunch.target)
    test_counts = np.bincount(s.test.labels.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 360 * counts / 1797) < 1)
    assert np.array_equal(test_counts + np.bincount(s.train.labels.numpy(), minlength=10), counts)
    # The split itself is pinned: changing it would silently change every digits result.
    assert s.test.labels[:10].tolist() == [5, 9, 2, 4, 6, 7, 9, 3, 4, 6]
    # Values 0..16 scaled to 0..255, and each image is one of sklearn's, in order.
    all_images = np.rint(bunch.data * 255 / 16).astype(np.uint8).reshape(-1, 1, 8, 8)
    assert s.train.images.max().item() == 255
    assert torch.equal(s.train.images[0], torch.from_numpy(all_images[0]))
    mean, std = channel_stats(s.train.images)
    assert s.mean == mean and s.std == std


def test_digits_max_per_class():
    pytest.importorskip("sklearn")
    s = load_dataset("DIGITS", max_per_class=5)
    assert len(s.train) == 50 and len(s.test) == 50
    assert np.bincount(s.train.labels.numpy()).tolist() == [5] * 10


def test_unknown_dataset_names_known_ones(tmp_path):
    with pytest.raises(ValueError, match="'cifar11'.*digits, cifar10, cifar100"):
        load_dataset("cifar11")
    with pytest.raises(ValueError, match="max_per_class"):
        load_dataset("digits", max_per_class=0)


# ================================================================= CIFAR (official pickle format)


def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_fake_cifar(root: Path, name: str, per_batch: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """A few images per file in the official python-pickle layout (bytes keys, as Python 2 wrote)."""
    rel = cifar_mod.RELEASES[name]
    folder = root / rel.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, files in (("train", rel.train_files), ("test", rel.test_files)):
        xs, ys = [], []
        for fname in files:
            data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
            labels = rng.integers(0, rel.num_classes, per_batch).tolist()
            d = {b"batch_label": fname.encode(), b"data": data, b"filenames": [b"x.png"] * per_batch}
            d[rel.label_key.encode()] = labels
            if name == "cifar100":
                d[b"coarse_labels"] = [y // 5 for y in labels]
            _write_pickle(folder / fname, d)
            xs.append(data)
            ys.append(labels)
        out[split + "_data"] = np.concatenate(xs)
        out[split + "_labels"] = np.concatenate(ys)
    names = [f"class{i:03d}".encode() for i in range(rel.num_classes)]
    meta = {rel.names_key.encode(): names, b"num_vis": 3072}
    if name == "cifar100":
        meta[b"coarse_label_names"] = [b"c"] * 20
    _write_pickle(folder / rel.meta_file, meta)
    return out


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_official_format(tmp_path, name):
    raw = write_fake_cifar(tmp_path, name)
    s = load_dataset(name, root=tmp_path)
    n_train = len(raw["train_data"])
    assert (len(s.train), len(s.test)) == (n_train, len(raw["test_data"]))
    assert (s.in_channels, s.image_size, s.num_classes) == (3, (32, 32), 10 if name == "cifar10" else 100)
    assert s.class_names[:2] == ["class000", "class001"]
    assert s.train.labels.tolist() == raw["train_labels"].tolist()
    # Row layout: 1024 red values, then green, then blue, each plane row-major.
    k = 7 % n_train
    row = raw["train_data"][k]
    img = s.train.images[k]
    assert img[0, 0, 0] == row[0] and img[0, 0, 5] == row[5] and img[0, 2, 1] == row[2 * 32 + 1]
    assert img[1, 0, 0] == row[1024] and img[2, 31, 31] == row[3071]
    assert s.mean == channel_stats(s.train.images)[0]


def test_cifar_max_per_class_and_env_root(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path, "cifar10", per_batch=20)
    monkeypatch.setenv("SPARSAM_DATA", str(tmp_path))
    s = load_dataset("cifar10", max_per_class=1)
    counts = np.bincount(s.train.labels.numpy(), minlength=10)
    assert counts.max() == 1 and len(s.train) == (counts > 0).sum()


def test_cifar_missing_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    for part in [
        str(tmp_path / "cifar-10-batches-py"),
        "data_batch_1",
        "test_batch",
        "batches.meta",
        "download=True",
        cifar_mod.RELEASES["cifar10"].url,
        "cifar-10-python.tar.gz",
    ]:
        assert part in msg


def _fake_archive(tmp_path: Path, name: str) -> tuple[Path, str]:
    src = tmp_path / "src"
    write_fake_cifar(src, name, per_batch=3)
    archive = tmp_path / "fake.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / cifar_mod.RELEASES[name].folder, arcname=cifar_mod.RELEASES[name].folder)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_cifar_download_checks_md5_and_extracts(tmp_path, monkeypatch):
    archive, md5 = _fake_archive(tmp_path, "cifar10")
    rel = cifar_mod.RELEASES["cifar10"]
    monkeypatch.setitem(
        cifar_mod.RELEASES, "cifar10", cifar_mod.CifarRelease(**{**rel.__dict__, "url": archive.as_uri(), "md5": md5})
    )
    root = tmp_path / "root"
    with pytest.raises(DatasetNotFoundError):
        load_dataset("cifar10", root=root)  # download=False: nothing fetched
    s = load_dataset("cifar10", root=root, download=True)
    assert len(s.train) == 15 and (root / rel.folder / "data_batch_5").is_file()
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []  # no scratch left behind


def test_cifar_archive_with_wrong_md5_is_refused(tmp_path, monkeypatch):
    archive, md5 = _fake_archive(tmp_path, "cifar100")
    rel = cifar_mod.RELEASES["cifar100"]
    root = tmp_path / "root"
    root.mkdir()
    (root / rel.archive).write_bytes(archive.read_bytes())  # a user-placed archive: checked, then extracted
    with pytest.raises(RuntimeError, match=rf"MD5 {md5}.*{rel.md5}"):
        load_dataset("cifar100", root=root)
    monkeypatch.setitem(cifar_mod.RELEASES, "cifar100", cifar_mod.CifarRelease(**{**rel.__dict__, "md5": md5}))
    assert len(load_dataset("cifar100", root=root).test) == 3
    monkeypatch.setitem(
        cifar_mod.RELEASES,
        "cifar100",
        cifar_mod.CifarRelease(**{**rel.__dict__, "url": archive.as_uri(), "md5": "0" * 32}),
    )
    with pytest.raises(RuntimeError, match="expected 0000"):
        load_dataset("cifar100", root=tmp_path / "other", download=True)
    assert not any((tmp_path / "other").iterdir())  # the bad download was not kept


def test_safe_extract_refuses_escaping_members(tmp_path):
    for evil in ("../evil.txt", "/abs.txt"):
        archive = tmp_path / "evil.tar"
        with tarfile.open(archive, "w") as tar:
            info = tarfile.TarInfo(evil)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"bad"))
        with pytest.raises(RuntimeError, match="refusing"):
            safe_extract_tar(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(RuntimeError, match="not a regular file"):
        safe_extract_tar(archive, tmp_path / "out")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickles_cannot_run_code(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", per_batch=2)
    _write_pickle(tmp_path / "cifar-10-batches-py" / "test_batch", {b"data": _Evil()})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_dataset("cifar10", root=tmp_path)


# ================================================================= image folders


def _save(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def make_folder(root: Path, *, classes=("zebra", "ant", "cat"), n=(3, 2), size=(6, 5), gray=False, test="test"):
    """PNG images (lossless) with known pixels; returns {relative path: array}."""
    rng = np.random.default_rng(1)
    written = {}
    for split, count in (("train", n[0]), (test, n[1])):
        for c in classes:
            for i in range(count):
                shape = size if gray else (*size, 3)
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                rel = f"{split}/{c}/{i:03d}.png"
                _save(root / rel, arr)
                written[rel] = arr
    return written


def test_image_folder_labels_pixels_and_stats(tmp_path):
    written = make_folder(tmp_path / "ds", test="val")
    (tmp_path / "ds" / "train" / "ant" / "notes.txt").write_text("not an image")
    s = load_dataset(str(tmp_path / "ds"), cache=False)
    assert s.class_names == ["ant", "cat", "zebra"]  # sorted folder names
    assert (s.num_classes, s.in_channels, s.image_size) == (3, 3, (6, 5))
    assert s.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert torch.equal(s.train.images[4], torch.from_numpy(written["train/cat/001.png"]).permute(2, 0, 1))
    assert torch.equal(s.test.images[5], torch.from_numpy(written["val/zebra/001.png"]).permute(2, 0, 1))
    assert (s.mean, s.std) == channel_stats(s.train.images)
    assert s.name == str((tmp_path / "ds").absolute())


def test_image_folder_grayscale_and_max_per_class(tmp_path):
    make_folder(tmp_path, gray=True, n=(4, 3))
    s = load_dataset(tmp_path, cache=False, max_per_class=2)
    assert s.in_channels == 1 and s.train.images.shape == (6, 1, 6, 5)
    assert s.test.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_image_folder_mixed_modes_become_rgb(tmp_path):
    written = make_folder(tmp_path, classes=("a", "b"), n=(2, 1))  # two classes: one alone is refused
    gray = np.arange(30, dtype=np.uint8).reshape(6, 5)
    _save(tmp_path / "train" / "a" / "gray.png", gray)
    with pytest.warns(UserWarning, match="1 grayscale images were converted to RGB"):
        s = load_dataset(tmp_path, cache=False)
    assert s.in_channels == 3
    assert torch.equal(s.train.images[2], torch.from_numpy(gray).expand(3, 6, 5))
    assert torch.equal(s.train.images[0], torch.from_numpy(written["train/a/000.png"]).permute(2, 0, 1))


def test_image_folder_errors(tmp_path):
    make_folder(tmp_path / "sizes")
    odd = tmp_path / "sizes" / "test" / "cat" / "odd.png"
    _save(odd, np.zeros((7, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=rf"6x5.*{odd}.*7x5"):
        load_dataset(tmp_path / "sizes", cache=False)

    make_folder(tmp_path / "cls")
    _save(tmp_path / "cls" / "test" / "dog" / "0.png", np.zeros((6, 5, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="dog.*does not exist in the train split"):
        load_dataset(tmp_path / "cls", cache=False)

    make_folder(tmp_path / "big", size=(40, 70), n=(1, 1))
    with pytest.raises(ValueError, match="40x70.*ImageFolderStream"):
        load_dataset(tmp_path / "big", cache=False, max_image_side=64)
    assert load_dataset(tmp_path / "big", cache=False, max_image_side=70).image_size == (40, 70)

    assert folder_image_size(tmp_path / "big") == (40, 70)
    (tmp_path / "notest" / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="neither a test/ nor a val/"):
        load_dataset(tmp_path / "notest")


def test_image_folder_cache(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds")
    cache_dir = tmp_path / "cache"
    first = load_dataset(tmp_path / "ds", cache_dir=cache_dir)
    files = list(cache_dir.glob("sparsam-*.npz"))
    assert len(files) == 1
    assert [p for p in cache_dir.iterdir() if p.name.startswith(".")] == []  # temp file renamed away

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    # decode_files is the one place load_image_folder decodes files; a valid entry must not reach it.
    monkeypatch.setattr(folder_mod, "decode_files", no_decoding)
    again = load_dataset(tmp_path / "ds", cache_dir=cache_dir)
    assert torch.equal(again.train.images, first.train.images) and torch.equal(again.test.labels, first.test.labels)
    assert (again.class_names, again.mean, again.std) == (first.class_names, first.mean, first.std)
    monkeypatch.undo()

    # Touching a file (new mtime) or a different max_per_class makes a new entry.
    f = tmp_path / "ds" / "train" / "ant" / "000.png"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset(tmp_path / "ds", cache_dir=cache_dir)
    load_dataset(tmp_path / "ds", cache_dir=cache_dir, max_per_class=1)
    assert len(list(cache_dir.glob("sparsam-*.npz"))) == 3

    # A damaged entry is rebuilt with a warning; cache=False writes nothing.
    files = sorted(cache_dir.glob("sparsam-*.npz"), key=os.path.getmtime)
    files[-1].write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache"):
        load_dataset(tmp_path / "ds", cache_dir=cache_dir, max_per_class=1)
    empty = tmp_path / "nocache"
    load_dataset(tmp_path / "ds", cache=False, cache_dir=empty)
    assert not empty.exists()


def test_image_folder_default_cache_dir_from_env(tmp_path, monkeypatch):
    make_folder(tmp_path / "ds", n=(1, 1))
    monkeypatch.setenv("SPARSAM_CACHE", str(tmp_path / "envcache"))
    load_dataset(tmp_path / "ds")
    assert len(list((tmp_path / "envcache").glob("sparsam-*.npz"))) == 1


def test_image_folder_workers_match_in_process(tmp_path):
    make_folder(tmp_path, n=(3, 1))
    monkey_chunk = folder_mod._CHUNK
    try:
        folder_mod._CHUNK = 2  # several chunks over two workers
        a = load_dataset(tmp_path, cache=False, num_workers=2)
    finally:
        folder_mod._CHUNK = monkey_chunk
    b = load_dataset(tmp_path, cache=False, num_workers=0)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)


def test_shared_cifar10_jpeg_subset(shared_data_dir):
    path = os.path.join(shared_data_dir, "cifar10-jpeg")
    if not os.path.isdir(path):
        pytest.skip(f"{path} not found")
    s = load_dataset(path, max_per_class=50, cache=False)
    assert s.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert s.train.images.shape == (500, 3, 32, 32) and s.test.images.shape == (500, 3, 32, 32)
    assert s.train.labels.tolist() == [c for c in range(10) for _ in range(50)]
    # README, full train split: mean 0.4913/0.4821/0.4465, std 0.2452/0.2428/0.2606.
    np.testing.assert_allclose(s.mean, [0.4913, 0.4821, 0.4465], atol=0.02)
    np.testing.assert_allclose(s.std, [0.2452, 0.2428, 0.2606], atol=0.02)


# ================================================================= streaming big images


def test_image_folder_stream(tmp_path):
    make_folder(tmp_path, size=(40, 60), n=(2, 1))
    train = ImageFolderStream(tmp_path, transform=RandomResizedCrop(16))
    assert len(train) == 6 and train.class_names == ["ant", "cat", "zebra"] and train.labels == [0, 0, 1, 1, 2, 2]
    torch.manual_seed(0)
    x, y = train[3]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and y == 1
    torch.manual_seed(0)
    assert torch.equal(train[3][0], x)  # reproducible from torch's generator
    test = ImageFolderStream(tmp_path, split="test", transform=ResizeCenterCrop(24, resize=30), mode="L")
    assert test[0][0].shape == (1, 24, 24)
    loader = torch.utils.data.DataLoader(test, batch_size=3)
    xb, yb = next(iter(loader))
    xn, yn = to_device_batch(xb, yb, device="cpu", mean=[0.5], std=[0.25], channels_last=True)
    torch.testing.assert_close(xn, (xb.float() / 255 - 0.5) / 0.25)
    assert xn.is_contiguous(memory_format=torch.channels_last) and yn.dtype == torch.int64


def test_random_resized_crop_box_is_inside_and_in_range():
    t = RandomResizedCrop(8, scale=(0.25, 0.5), ratio=(0.5, 2.0))
    torch.manual_seed(0)
    for _ in range(200):
        left, top, w, h = t.box(50, 30)
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 30
        assert 0.2 <= w * h / 1500 <= 0.55 and 0.4 <= w / h <= 2.5  # rounding slack
    # No random box fits a 1000x10 image: the fallback is the widest centred crop with ratio 4/3.
    assert RandomResizedCrop(8, scale=(0.99, 1.0)).box(1000, 10) == (493, 0, 13, 10)
    with pytest.raises(ValueError, match="scale"):
        RandomResizedCrop(8, scale=(0.5, 0.1))


# ================================================================= batched augmentation


def test_random_crop_equals_per_image_reference():
    x = torch.randint(0, 256, (16, 3, 7, 9), generator=gen(1), dtype=torch.uint8)
    g = gen(5)
    state = g.get_state()
    out = random_crop(x, padding=3, generator=g)
    g.set_state(state)
    offsets = torch.randint(0, 7, (2, 16), generator=g)  # the documented draw
    padded = torch.zeros(16, 3, 13, 15, dtype=torch.uint8)
    padded[:, :, 3:10, 3:12] = x
    for i in range(16):
        dy, dx = offsets[:, i].tolist()
        assert torch.equal(out[i], padded[i, :, dy : dy + 7, dx : dx + 9])
    assert out.dtype == torch.uint8 and out.is_contiguous()
    assert torch.equal(random_crop(x, padding=0, generator=g), x)


def test_flip_statistics_and_exactness():
    x = torch.randn(4000, 1, 2, 3, generator=gen(2))
    out = random_flip(x, generator=gen(3))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all()) and not bool((flipped & kept).any())
    assert abs(flipped.float().mean().item() - 0.5) < 0.04  # 5 sigma of a binomial(4000, 0.5) mean
    assert torch.equal(random_flip(x, p=0.0, generator=gen(3)), x)
    assert torch.equal(random_flip(x, p=1.0, generator=gen(3)), x.flip(-1))


def test_cutout_matches_reference_and_statistics():
    n, h, w, size = 3000, 10, 12, 6
    x = torch.ones(n, 2, h, w)
    g = gen(7)
    state = g.get_state()
    out = cutout(x, size=size, p=0.5, generator=g)
    g.set_state(state)
    apply = torch.rand(n, generator=g) < 0.5
    cy, cx = torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)
    ref = x.clone()
    for i in range(n):
        if apply[i]:
            t, l = int(cy[i]) - size // 2, int(cx[i]) - size // 2
            ref[i, :, max(t, 0) : max(t + size, 0), max(l, 0) : max(l + size, 0)] = 0
    assert torch.equal(out, ref)
    cut = (out == 0).flatten(1).any(1)
    assert abs(cut.float().mean().item() - 0.5) < 0.05
    # Centres anywhere: some squares are clipped at a border, none exceeds size x size per channel.
    zeros = (out[:, 0] == 0).flatten(1).sum(1)
    assert zeros.max().item() == size * size and 0 < zeros[cut].min().item() < size * size
    assert torch.equal(cutout(x, size=size, p=0.0, generator=gen(7)), x)


def test_cifar_augment_composition_dtypes_and_determinism():
    x = torch.randint(0, 256, (64, 3, 32, 32), generator=gen(0), dtype=torch.uint8)
    a = cifar_augment(x, generator=gen(11))
    b = cifar_augment(x, generator=gen(11))
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert not torch.equal(a, cifar_augment(x, generator=gen(12)))
    g = gen(11)
    ref = cutout(random_flip(random_crop(x, padding=4, generator=g), generator=g), size=16, p=0.5, generator=g)
    assert torch.equal(a, ref)
    xf = x.float() / 255
    torch.testing.assert_close(cifar_augment(xf, generator=gen(11)), a.float() / 255)
    plain = cifar_augment(x, generator=gen(11), crop_padding=0, flip=False, cutout=0)
    assert torch.equal(plain, x)
    with pytest.raises(ValueError, match="cutout_p|p must"):
        cifar_augment(x, generator=gen(0), cutout_p=1.5)
    with pytest.raises(ValueError, match="padding.*-1"):
        cifar_augment(x, generator=gen(0), crop_padding=-1)


# ================================================================= DeviceLoader


def test_loader_normalises_and_covers_the_data_once():
    ds = tiny_dataset(n=10)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 0.125]
    loader = DeviceLoader(ds, batch_size=4, shuffle=True, mean=mean, std=std, seed=3)
    assert len(loader) == 3
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    idx = loader.indices()
    assert sorted(idx.tolist()) == list(range(10)) and idx.tolist() != list(range(10))
    x = torch.cat([b[0] for b in batches])
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, (ds.images[idx].float() / 255 - m) / s)
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels[idx])
    assert x.dtype == torch.float32 and batches[0][1].dtype == torch.int64


def test_loader_epochs_are_deterministic():
    ds = tiny_dataset(n=50)
    loader = DeviceLoader(ds, batch_size=8, shuffle=True, seed=1, augment=cifar_augment)
    first = [x for x, _ in loader]
    again = [x for x, _ in loader]  # same epoch: same batches
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    loader.set_epoch(1)
    assert loader.indices().tolist() != DeviceLoader(ds, batch_size=8, shuffle=True, seed=1).indices().tolist()
    other = DeviceLoader(ds, batch_size=8, shuffle=True, seed=1, augment=cifar_augment)
    other.set_epoch(1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(loader, other))
    with pytest.raises(ValueError, match="epoch.*-1"):
        loader.set_epoch(-1)


@pytest.mark.parametrize("drop_last", [False, True])
def test_loader_shards_like_distributed_sampler(drop_last):
    ds = tiny_dataset(n=11)
    ws = 3
    loaders = [
        DeviceLoader(ds, batch_size=2, shuffle=True, drop_last=drop_last, seed=4, rank=r, world_size=ws)
        for r in range(ws)
    ]
    for ld in loaders:
        ld.set_epoch(2)
    shards = [ld.indices().tolist() for ld in loaders]
    per_rank = 3 if drop_last else 4
    assert all(len(s) == per_rank for s in shards)
    perm = DeviceLoader(ds, batch_size=2, shuffle=True, seed=4)
    perm.set_epoch(2)
    order = perm.indices().tolist()
    order = order[:9] if drop_last else order + order[:1]
    assert [order[r::ws] for r in range(ws)] == shards  # one shared permutation, strided
    union = sum(shards, [])
    if drop_last:
        assert len(set(union)) == 9
    else:
        assert set(union) == set(range(11))
    assert [len(ld) for ld in loaders] == [1 if drop_last else 2] * ws
    assert [len(y) for _, y in loaders[0]] == ([2] if drop_last else [2, 2])


def test_loader_options_and_errors():
    ds = tiny_dataset(n=6, h=8, w=8)
    seen = {}

    def aug(x, *, generator):
        seen["g"] = generator
        return x + 1

    loader = DeviceLoader(ds, batch_size=6, augment=aug, channels_last=True, dtype=torch.bfloat16)
    x, _ = next(iter(loader))
    assert isinstance(seen["g"], torch.Generator)
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.float(), (ds.images.float() / 255 + 1).bfloat16().float())
    bad = [
        ({"batch_size": 0}, "batch_size.*0"),
        ({"rank": 2, "world_size": 2}, "rank.*2"),
        ({"std": [1.0, 0.0, 1.0]}, r"std.*\[1.0, 0.0, 1.0\]"),
        ({"mean": [0.5, 0.5]}, r"mean.*\[0.5, 0.5\]"),
        ({"dtype": torch.int64}, "dtype.*int64"),
        ({"shuffle": 1}, "shuffle.*1"),
    ]
    for kw, match in bad:
        with pytest.raises((ValueError, TypeError), match=match):
            DeviceLoader(ds, **{"batch_size": 2, **kw})


def test_make_loaders():
    train_ds, test_ds = tiny_dataset(n=10), tiny_dataset(n=5)
    from sparsam.data import DatasetSplits

    splits = DatasetSplits("toy", train_ds, test_ds, 3, 3, (4, 4), [0.5] * 3, [0.25] * 3, ["a", "b", "c"])
    train, test = make_loaders(
        splits, batch_size=4, augment=partial(cifar_augment, crop_padding=1, cutout=2), eval_batch_size=2
    )
    assert (len(train), len(test)) == (2, 3)  # train drops the last partial batch, test keeps it
    assert train.shuffle and not test.shuffle and test.augment is None
    xs = torch.cat([x for x, _ in test])
    torch.testing.assert_close(xs, (test_ds.images.float() / 255 - 0.5) / 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(x.shape == (4, 3, 4, 4) for x, _ in train)
