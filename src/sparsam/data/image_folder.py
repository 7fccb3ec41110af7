"""Folders of small images in the ImageNet layout, decoded once into memory and cached on disk.

Layout:

```text
root/train/<class_name>/*.{jpg,jpeg,png,bmp,gif,webp,tif,tiff,ppm,pgm,pbm}
root/test/<class_name>/...      (or root/val/...; test wins if both exist)
```

- Classes are the sub-folders of ``train`` (hidden ones skipped); class index = position of the
  folder name in sorted order (Python string order). A test class folder unknown to train is an error.
- Files of a class are taken in sorted name order; ``max_per_class`` keeps the first n of each.
- Every image of the dataset (both splits) must have one size, else a ValueError names the first file
  with a different size. Images larger than ``max_image_side`` on a side are refused with a pointer to
  ``sparsam.data.ImageFolderStream``, which streams big images instead of holding them in memory.
- Modes: grayscale-like images (Pillow modes 1, L, LA, I, I;16, F) are read as one channel, anything
  else as RGB (alpha dropped). If a dataset mixes the two, every image becomes RGB (grayscale images
  are replicated over three channels): nothing is lost, and ``in_channels`` is 3.
- Decoding runs in ``num_workers`` processes (torch DataLoader workers, Pillow decoders), and the
  decoded uint8 arrays are cached in ``<cache_dir>/sparsam-<key>.npz``. The key hashes the folder's
  absolute path, ``max_per_class`` and every selected file's relative path, size and modification
  time, so editing, adding or removing an image makes a new entry. The cache file is written to a
  temporary name and renamed into place (atomic), so concurrent loaders never read half a file.
  Default cache folder: ``$SPARSAM_CACHE``, else ``$XDG_CACHE_HOME/sparsam``, else ``~/.cache/sparsam``;
  the folder in use is printed on stderr the first time a process uses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ._files import atomic_path
from .dataset import ArrayDataset, DatasetSplits, channel_stats, check_max_per_class

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
)
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
_CACHE_FORMAT = 1
_CHUNK = 256  # files decoded per worker task


_ANNOUNCED: set[Path] = set()


def _announce_cache(folder: Path, *, from_default: bool) -> None:
    """Say on stderr where decoded images are cached, once per folder and process (rank 0 only)."""
    folder = folder.absolute()
    if folder in _ANNOUNCED or os.environ.get("RANK", "0") != "0":
        return
    _ANNOUNCED.add(folder)
    how = " (set SPARSAM_CACHE to use another folder)" if from_default else ""
    print(f"sparsam: decoded images are cached in {folder}{how}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    """``$SPARSAM_CACHE``, else ``$XDG_CACHE_HOME/sparsam``, else ``~/.cache/sparsam``."""
    if os.environ.get("SPARSAM_CACHE"):
        return Path(os.environ["SPARSAM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparsam"


def find_split_dirs(root: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(root/train, root/test or root/val)``; a clear error if either is missing."""
    root = Path(root)
    train = root / "train"
    if not train.is_dir():
        raise FileNotFoundError(f"image folder {root} has no train/ sub-folder (expected root/train/<class>/*.jpg)")
    for name in ("test", "val"):
        if (root / name).is_dir():
            return train, root / name
    raise FileNotFoundError(f"image folder {root} has neither a test/ nor a val/ sub-folder")


def list_classes(split_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted names of the class folders of a split (hidden folders skipped)."""
    names = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not names:
        raise FileNotFoundError(f"{split_dir} has no class sub-folders")
    return names


class DamagedImageError(ValueError):
    """Image files that cannot be decoded (truncated, corrupted or not images at all).

    Attributes:
        files: ``(path, reason)`` of every damaged file found (possibly empty when the error was
            raised again in the main process from a DataLoader worker).
    """

    def __init__(self, message: str, files: Sequence[tuple[str, str]] = ()) -> None:
        # A DataLoader worker's exception is raised again in the main process as
        # DamagedImageError("Caught DamagedImageError in DataLoader worker ...<traceback>...: <message>");
        # keep only the message, so the user sees one line naming the file, not the worker's traceback.
        marker = "DamagedImageError: "
        if message.startswith("Caught DamagedImageError") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)
        self.files = list(files)


_SKIP_HINT = "remove or replace them, or skip them with skip_damaged=True (sparsam train: --skip-damaged)"


def damaged_message(damaged: Sequence[tuple[str, str]], where: str | os.PathLike[str]) -> str:
    """One line: how many files of ``where`` are damaged, the first one and why."""
    path, reason = damaged[0]
    more = f" ({len(damaged)} damaged image files in {where}; the first is shown)" if len(damaged) > 1 else ""
    return f"damaged image file {path}: {reason}{more}; {_SKIP_HINT}"


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def check_classes(train_dir: str | os.PathLike[str], class_names: Sequence[str], labels: Sequence[int]) -> None:
    """Refuse a train split with fewer than two classes that hold images (a classifier of one class
    is trivially right); warn about class folders without any image in the train split."""
    counts = [0] * len(class_names)
    for y in labels:
        counts[y] += 1
    empty = [c for c, n in zip(class_names, counts) if n == 0]
    with_images = [c for c, n in zip(class_names, counts) if n > 0]
    if len(with_images) < 2:
        found = ", ".join(f"{c} ({n} images)" for c, n in zip(class_names, counts))
        raise ValueError(
            f"{train_dir} has {len(with_images)} class folder(s) with images ({found}): classification needs "
            "at least two classes (one sub-folder of images per class)"
        )
    if empty:
        warnings.warn(
            f"class folder(s) {', '.join(empty)} of {train_dir} hold no image files: the model gets an output for "
            "each that is never trained",
            stacklevel=3,
        )


def _image_names(folder: Path) -> list[str]:
    """Sorted names of the image files (by extension, case-insensitive; hidden files skipped) in a folder."""
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and not e.name.startswith(".") and e.name.lower().endswith(IMAGE_EXTENSIONS)
    )


def scan_split(
    split_dir: str | os.PathLike[str], class_names: Sequence[str], *, max_per_class: int | None = None
) -> tuple[list[str], list[int]]:
    """Image files (absolute paths) and labels of one split; label = index in ``class_names``."""
    split_dir = Path(split_dir)
    index = {c: i for i, c in enumerate(class_names)}
    files: list[str] = []
    labels: list[int] = []
    for cls in list_classes(split_dir):
        if cls not in index:
            raise ValueError(
                f"class folder {split_dir / cls} does not exist in the train split "
                f"(known classes: {', '.join(class_names)})"
            )
        names = _image_names(split_dir / cls)
        if max_per_class is not None:
            names = names[:max_per_class]
        files += [str(split_dir / cls / n) for n in names]
        labels += [index[cls]] * len(names)
    return files, labels


def decode_image(path: str) -> np.ndarray:
    """Decode one image with Pillow into uint8 (H, W, C), C = 1 for grayscale-like modes, else 3."""
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"), dtype=np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _try_decode(path: str) -> np.ndarray | str:
    """The decoded image, or why it cannot be decoded (a damaged file is data, not a crash)."""
    try:
        return decode_image(path)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return _reason(e)


class _DecodeChunks(Dataset):
    """Item i = the decoded images of files[i * chunk : (i + 1) * chunk] (for DataLoader workers);
    a file that cannot be decoded is returned as the reason (a str), so no worker raises."""

    def __init__(self, files: Sequence[str], chunk: int) -> None:
        self.files = list(files)
        self.chunk = chunk

    def __len__(self) -> int:
        return (len(self.files) + self.chunk - 1) // self.chunk

    def __getitem__(self, i: int) -> list[np.ndarray | str]:
        return [_try_decode(f) for f in self.files[i * self.chunk : (i + 1) * self.chunk]]


def _keep_as_is(x: list[Any]) -> list[Any]:
    return x


def decode_files(
    files: Sequence[str], *, num_workers: int = 0
) -> tuple[list[np.ndarray | None], list[tuple[str, str]]]:
    """Decode ``files`` (in ``num_workers`` processes): one array (H, W, C) per file, ``None`` for a
    damaged file, and the ``(path, reason)`` of every damaged file."""
    loader = DataLoader(
        _DecodeChunks(files, _CHUNK),
        batch_size=None,
        num_workers=num_workers if files else 0,
        collate_fn=_keep_as_is,
    )
    arrays: list[np.ndarray | None] = []
    damaged: list[tuple[str, str]] = []
    for chunk in loader:
        for item in chunk:
            if isinstance(item, str):
                damaged.append((files[len(arrays)], item))
                arrays.append(None)
            else:
                arrays.append(item)
    return arrays, damaged


def stack_images(files: Sequence[str], arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """Decoded images (H, W, C arrays of one size, named by ``files``) as one uint8 (N, C, H, W)
    array, grayscale planes replicated where others are RGB; returns it and how many were converted."""
    if not arrays:
        return np.zeros((0, 1, 0, 0), dtype=np.uint8), 0
    h, w, _ = arrays[0].shape
    for f, a in zip(files, arrays):
        if a.shape[:2] != (h, w):
            raise ValueError(
                f"all images must have one size: {files[0]} is {h}x{w} (HxW) but {f} is "
                f"{a.shape[0]}x{a.shape[1]}; resize them first or use ImageFolderStream"
            )
    channels = max(a.shape[2] for a in arrays)
    out = np.empty((len(arrays), channels, h, w), dtype=np.uint8)
    converted = 0
    for i, a in enumerate(arrays):
        if a.shape[2] != channels:
            converted += 1
        out[i] = a.transpose(2, 0, 1)  # broadcasting replicates a grayscale plane over RGB
    return out, converted


def _cache_key(root: Path, max_per_class: int | None, splits: dict[str, list[str]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": _CACHE_FORMAT, "root": str(root), "max_per_class": max_per_class}).encode())
    for split, files in splits.items():
        h.update(f"\0{split}\0".encode())
        for f in files:
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def folder_image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(H, W) of the first image (sorted classes and names) of ``path/train``, from its header only.

    Lets a caller choose between [`load_dataset`][sparsam.data.load_dataset] (small images, in
    memory) and [`ImageFolderStream`][sparsam.data.ImageFolderStream] (large images) before loading
    anything.
    """
    from PIL import Image

    train_dir, _ = find_split_dirs(Path(path).expanduser())
    classes = list_classes(train_dir)
    for cls in classes:
        names = _image_names(train_dir / cls)
        if names:
            with Image.open(train_dir / cls / names[0]) as im:  # reads the header only
                w, h = im.size
            return h, w
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")


def _check_side(files: Sequence[str], max_image_side: int) -> None:
    from PIL import Image

    if not files:
        return
    try:
        with Image.open(files[0]) as im:  # reads the header only
            w, h = im.size
    except Exception:  # noqa: BLE001 - a damaged file: decoding reports it (or skips it)
        return
    if max(h, w) > max_image_side:
        raise ValueError(
            f"{files[0]} is {h}x{w} (HxW), larger than max_image_side={max_image_side}: load_dataset keeps "
            f"whole folders in memory, which is meant for small images. Use ImageFolderStream for large "
            f"images, or raise max_image_side if the folder fits in memory."
        )


def load_image_folder(
    path: str | os.PathLike[str],
    *,
    max_per_class: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    max_image_side: int = 64,
    skip_damaged: bool = False,
) -> DatasetSplits:
    """A folder of small images (see the module docstring) as in-memory ``DatasetSplits``.

    Args:
        path: the folder holding ``train/`` and ``test/`` (or ``val/``).
        max_per_class: keep the first n files (sorted names) of each class of each split.
        cache: read/write the decoded arrays from/to the cache folder.
        cache_dir: the cache folder (default ``default_cache_dir()``).
        num_workers: decoding processes; ``None`` = up to 8 (as many as CPUs) for more than 2000
            files, else 0 (decode in this process).
        max_image_side: refuse images with a longer side than this (use ``ImageFolderStream``).
        skip_damaged: leave out files that cannot be decoded (truncated, corrupted), with a warning
            that counts them; otherwise [`DamagedImageError`][sparsam.data.DamagedImageError] names
            the first (decoding goes on to the end first, so the count is complete).

    A train split with fewer than two classes that hold images is refused (``ValueError``); a class
    folder without train images gets a warning. ``mean`` / ``std`` are computed on the loaded train split.
    """
    max_per_class = check_max_per_class(max_per_class)
    if not isinstance(cache, bool):
        raise TypeError(f"cache must be a bool, got {cache!r}")
    if not isinstance(skip_damaged, bool):
        raise TypeError(f"skip_damaged must be a bool, got {skip_damaged!r}")
    bad_workers = isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0
    if num_workers is not None and bad_workers:
        raise ValueError(f"num_workers must be a non-negative int or None, got {num_workers!r}")
    root = Path(path).expanduser().absolute()
    train_dir, test_dir = find_split_dirs(root)
    class_names = list_classes(train_dir)
    train_files, train_labels = scan_split(train_dir, class_names, max_per_class=max_per_class)
    test_files, test_labels = scan_split(test_dir, class_names, max_per_class=max_per_class)
    if not train_files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {train_dir}")
    check_classes(train_dir, class_names, train_labels)

    cache_file: Path | None = None
    if cache:
        key = _cache_key(root, max_per_class, {"train": train_files, "test": test_files})
        cache_file = Path(default_cache_dir() if cache_dir is None else cache_dir).expanduser() / f"sparsam-{key}.npz"
        _announce_cache(cache_file.parent, from_default=cache_dir is None)
        if cache_file.is_file():
            try:
                with np.load(cache_file, allow_pickle=False) as z:
                    arrays = {k: z[k] for k in z.files}
                splits = _splits_from_arrays(str(root), arrays)
            except Exception as e:  # a damaged cache entry is rebuilt, not fatal
                warnings.warn(f"ignoring unreadable cache file {cache_file}: {e}", stacklevel=2)
            else:  # the entry remembers the damaged files it left out
                paths = arrays["skipped"].tolist() if "skipped" in arrays else []
                reasons = arrays["skipped_reasons"].tolist() if "skipped_reasons" in arrays else []
                _report_damaged(list(zip(paths, reasons)), root, skip_damaged)
                return splits

    _check_side(train_files, max_image_side)
    n_files = len(train_files) + len(test_files)
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1) if n_files > 2000 else 0
    files = train_files + test_files
    decoded, damaged = decode_files(files, num_workers=num_workers)
    _report_damaged(damaged, root, skip_damaged)
    if damaged:
        n_train = len(train_files)
        train_labels = [y for y, a in zip(train_labels, decoded[:n_train]) if a is not None]
        test_labels = [y for y, a in zip(test_labels, decoded[n_train:]) if a is not None]
        files = [f for f, a in zip(files, decoded) if a is not None]
        check_classes(train_dir, class_names, train_labels)
    images, converted = stack_images(files, [a for a in decoded if a is not None])
    if converted:
        warnings.warn(
            f"{root} mixes grayscale and colour images: {converted} grayscale images were converted to RGB",
            stacklevel=2,
        )
    n_train = len(train_labels)
    train_x, test_x = images[:n_train], images[n_train:]
    mean, std = channel_stats(torch.from_numpy(train_x))
    arrays = {
        "train_images": train_x,
        "train_labels": np.asarray(train_labels, dtype=np.int64),
        "test_images": test_x,
        "test_labels": np.asarray(test_labels, dtype=np.int64),
        "class_names": np.asarray(class_names, dtype=np.str_),
        "mean": np.asarray(mean, dtype=np.float64),
        "std": np.asarray(std, dtype=np.float64),
        "skipped": np.asarray([p for p, _ in damaged], dtype=np.str_),
        "skipped_reasons": np.asarray([r for _, r in damaged], dtype=np.str_),
    }
    if cache_file is not None:
        try:
            with atomic_path(cache_file, suffix=".npz") as tmp:
                np.savez(tmp, **arrays)
        except OSError as e:  # a read-only or full cache folder must not stop training
            warnings.warn(f"could not write cache file {cache_file}: {e}", stacklevel=2)
    return _splits_from_arrays(str(root), arrays)


def _report_damaged(damaged: Sequence[tuple[str, str]], root: Path, skip: bool) -> None:
    if not damaged:
        return
    if not skip:
        raise DamagedImageError(damaged_message(damaged, root), damaged)
    path, reason = damaged[0]
    warnings.warn(f"skipped {len(damaged)} damaged image file(s) of {root} (first: {path}: {reason})", stacklevel=3)


def _splits_from_arrays(name: str, a: dict[str, np.ndarray]) -> DatasetSplits:
    train = ArrayDataset(torch.from_numpy(np.ascontiguousarray(a["train_images"])), torch.from_numpy(a["train_labels"]))
    test_images = a["test_images"]
    if test_images.shape[0] == 0:
        test_images = np.zeros((0, *a["train_images"].shape[1:]), dtype=np.uint8)
    test = ArrayDataset(torch.from_numpy(np.ascontiguousarray(test_images)), torch.from_numpy(a["test_labels"]))
    _, c, h, w = train.images.shape
    class_names = [str(s) for s in a["class_names"].tolist()]
    return DatasetSplits(
        name=name,
        train=train,
        test=test,
        num_classes=len(class_names),
        in_channels=c,
        image_size=(h, w),
        mean=[float(v) for v in a["mean"]],
        std=[float(v) for v in a["std"]],
        class_names=class_names,
    )
