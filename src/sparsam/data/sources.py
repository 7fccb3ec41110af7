"""``load_dataset``: one entry point for every in-memory dataset, by name or folder path."""

from __future__ import annotations

import os

from .cifar import RELEASES, load_cifar
from .dataset import DatasetSplits
from .digits import load_digits_splits
from .image_folder import load_image_folder

DATASET_NAMES: tuple[str, ...] = ("digits", "cifar10", "cifar100")
"""The built-in data set names of [`load_dataset`][sparsam.data.load_dataset]; any other argument
is an image folder."""


def load_dataset(
    name_or_path: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    max_per_class: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
    max_image_side: int = 64,
    skip_damaged: bool = False,
) -> DatasetSplits:
    """Load a dataset into memory: uint8 images (N, C, H, W) and int64 labels per split.

    Args:
        name_or_path: ``"digits"``, ``"cifar10"``, ``"cifar100"`` (case-insensitive), or a folder in
            the ImageNet layout ``<path>/{train,test|val}/<class>/<image>``.
        root: for CIFAR, the folder holding ``cifar-10-batches-py`` / ``cifar-100-python`` (default
            ``$SPARSAM_DATA``, else ``./data``). Ignored by the other sources.
        download: CIFAR only: fetch the official archive (MD5-checked) if the files are missing.
        max_per_class: keep only the first n images of each class in each split (file order for
            CIFAR and digits, sorted file names for folders): quick experiments and tests.
        cache, cache_dir, num_workers, max_image_side: image folders only: the decoded images are
            cached in ``cache_dir`` (default [`default_cache_dir`][sparsam.data.default_cache_dir])
            unless ``cache=False``; ``num_workers`` decoding processes; images with a side above
            ``max_image_side`` are refused (use [`ImageFolderStream`][sparsam.data.ImageFolderStream]).
        skip_damaged: image folders only: leave out image files that cannot be decoded (truncated,
            corrupted) with a warning that counts them, instead of raising
            [`DamagedImageError`][sparsam.data.DamagedImageError].

    ``mean`` and ``std`` of the result are computed on the loaded train split, per channel, over
    every pixel (population std), on the 0..1 scale.

    Raises:
        ValueError: neither a known name nor an existing folder (the message lists the names).
        DatasetNotFoundError: CIFAR files missing and not downloaded (says where to put what).
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a dataset name or a folder path, got {name_or_path!r}")
    key = os.fspath(name_or_path)
    if key.lower() == "digits":
        return load_digits_splits(max_per_class=max_per_class)
    if key.lower() in RELEASES:
        return load_cifar(key.lower(), root=root, download=download, max_per_class=max_per_class)
    if os.path.isdir(key):
        return load_image_folder(
            key,
            max_per_class=max_per_class,
            cache=cache,
            cache_dir=cache_dir,
            num_workers=num_workers,
            max_image_side=max_image_side,
            skip_damaged=skip_damaged,
        )
    raise ValueError(
        f"unknown dataset {key!r}: not one of {', '.join(DATASET_NAMES)} and not an existing folder "
        f"(expected an image folder with train/ and test/ or val/ sub-folders)"
    )
