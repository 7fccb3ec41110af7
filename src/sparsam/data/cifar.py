"""CIFAR-10 and CIFAR-100 (Krizhevsky, 2009) from the official python-pickle release.

Layout under ``root`` (the folder the official archives extract into):

```text
root/cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch, batches.meta}
root/cifar-100-python/{train, test, meta}
```

If the folder is missing but the official archive (``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz``) lies in ``root``, it is checked against its published MD5 and extracted.
Otherwise, with ``download=True`` the archive is fetched from the canonical URL, checked and
extracted; with ``download=False`` a ``DatasetNotFoundError`` says what to put where.

The pickles are read with a restricted unpickler that only builds numpy arrays and plain Python
containers, so a tampered file cannot run code. CIFAR-100 labels are the 100 fine labels.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._files import download as _download
from ._files import md5sum, safe_extract_tar
from .dataset import ArrayDataset, DatasetSplits, channel_stats, check_max_per_class, take_per_class


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they should be; the message says what to put where."""


@dataclass(frozen=True)
class CifarRelease:
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int


# The official releases (https://www.cs.toronto.edu/~kriz/cifar.html) and their published MD5s.
RELEASES: dict[str, CifarRelease] = {
    "cifar10": CifarRelease(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        meta_file="batches.meta",
        label_key="labels",
        names_key="label_names",
        num_classes=10,
    ),
    "cifar100": CifarRelease(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
    ),
}

# What a CIFAR pickle may construct: numpy arrays and dtypes (module paths of numpy 1 and 2), and
# bytes (protocol-2 pickles written by Python 3 build bytes with _codecs.encode).
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR pickle refers to {module}.{name}, which is not allowed")


def _read_pickle(path: Path) -> dict[str, Any]:
    """Read one official pickle (written by Python 2, hence ``encoding="bytes"``); keys become str."""
    with open(path, "rb") as f:
        obj = _RestrictedUnpickler(f, encoding="bytes").load()
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR pickle: expected a dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batches(folder: Path, files: tuple[str, ...], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = folder / name
        d = _read_pickle(path)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{path} lacks the 'data' or {label_key!r} entry of the official CIFAR format")
        data = np.asarray(d["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
        y = np.asarray(d[label_key], dtype=np.int64)
        if y.shape != (data.shape[0],):
            raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {y.shape}")
        # Rows hold the red, green, blue 32x32 planes one after the other, each row-major.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return np.concatenate(images), np.concatenate(labels)


def default_root() -> str:
    """``$SPARSAM_DATA`` if set, else ``./data``."""
    return os.environ.get("SPARSAM_DATA") or "data"


def _missing_message(name: str, rel: CifarRelease, root: Path, missing: list[str]) -> str:
    return (
        f"{name} not found: missing {', '.join(missing)} in {root / rel.folder}.\n"
        f"Either pass download=True (the CLI's --download) to fetch {rel.url} (MD5 {rel.md5}) "
        f"into {root}, or download that file yourself and put {rel.archive} in {root} "
        f"(it is checked and extracted on the next load), or extract it there "
        f"(tar -xzf {rel.archive} -C {root}) so that {root / rel.folder} holds "
        f"{', '.join(rel.train_files + rel.test_files + (rel.meta_file,))}. "
        f"The data root is the root= argument, else $SPARSAM_DATA, else ./data."
    )


def _extract_release(rel: CifarRelease, archive: Path, root: Path) -> None:
    got = md5sum(archive)
    if got != rel.md5:
        raise RuntimeError(
            f"{archive} has MD5 {got}, but the official {rel.archive} has {rel.md5}; "
            f"delete it and download again (download=True)"
        )
    # Extract into a scratch folder first so an interrupted extraction never leaves a half folder.
    scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        safe_extract_tar(archive, scratch)
        if not (scratch / rel.folder).is_dir():
            raise RuntimeError(f"{archive} does not contain the folder {rel.folder}")
        os.replace(scratch / rel.folder, root / rel.folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_cifar(
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    max_per_class: int | None = None,
) -> DatasetSplits:
    """CIFAR-10 or CIFAR-100 (``name`` = ``"cifar10"`` / ``"cifar100"``) as ``DatasetSplits``.

    ``max_per_class`` keeps the first n images of each class of each split (file order).
    ``mean`` / ``std`` are computed on the loaded train split (for the full official CIFAR-10:
    0.4914, 0.4822, 0.4465 / 0.2470, 0.2435, 0.2616).
    """
    if name not in RELEASES:
        raise ValueError(f"unknown CIFAR dataset {name!r}; known: {', '.join(RELEASES)}")
    if not isinstance(download, bool):
        raise TypeError(f"download must be a bool, got {download!r}")
    max_per_class = check_max_per_class(max_per_class)
    rel = RELEASES[name]
    root_path = Path(default_root() if root is None else root).expanduser().absolute()
    folder = root_path / rel.folder
    needed = rel.train_files + rel.test_files + (rel.meta_file,)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing and not folder.exists():
        archive = root_path / rel.archive
        if not archive.is_file() and download:
            _download(rel.url, archive, md5=rel.md5)
        if archive.is_file():
            _extract_release(rel, archive, root_path)
            missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DatasetNotFoundError(_missing_message(name, rel, root_path, missing))

    meta = _read_pickle(folder / rel.meta_file)
    if rel.names_key not in meta:
        raise ValueError(f"{folder / rel.meta_file} lacks {rel.names_key!r}")
    class_names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in meta[rel.names_key]]
    if len(class_names) != rel.num_classes:
        raise ValueError(f"{folder / rel.meta_file}: expected {rel.num_classes} class names, got {len(class_names)}")

    def split(files: tuple[str, ...]) -> ArrayDataset:
        x, y = _read_batches(folder, files, rel.label_key)
        if y.size and (y.min() < 0 or y.max() >= rel.num_classes):
            raise ValueError(f"{name} labels in {folder} must lie in [0, {rel.num_classes}), got {y.min()}..{y.max()}")
        keep = take_per_class(y.tolist(), max_per_class) if max_per_class is not None else slice(None)
        return ArrayDataset(torch.from_numpy(np.ascontiguousarray(x[keep])), torch.from_numpy(y[keep].copy()))

    train, test = split(rel.train_files), split(rel.test_files)
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        num_classes=rel.num_classes,
        in_channels=3,
        image_size=(32, 32),
        mean=mean,
        std=std,
        class_names=class_names,
    )
