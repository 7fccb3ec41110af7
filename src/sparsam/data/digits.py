"""scikit-learn's bundled handwritten digits (8x8 grayscale, 10 classes, 1797 images; no download).

The split is fixed: 360 test images, 1437 train, stratified by class. Each class c contributes
``round(360 * n_c / 1797)`` test images (largest-remainder rounding, so the counts sum to exactly 360),
chosen by ``numpy.random.default_rng(0).permutation`` of that class's indices, classes visited in
order 0..9 with one shared generator. Both splits keep the original sample order.
Pixel values 0..16 are scaled to uint8 by ``round(v * 255 / 16)``.
"""

from __future__ import annotations

import numpy as np
import torch

from .dataset import ArrayDataset, DatasetSplits, channel_stats, check_max_per_class, take_per_class

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0


def stratified_split(labels: np.ndarray, test_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), both sorted; per-class test counts by largest remainder."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = test_size * counts / counts.sum()
    take = np.floor(quota).astype(np.int64)
    short = test_size - int(take.sum())
    # Largest remainders first; ties broken by class order (stable sort).
    order = np.argsort(-(quota - take), kind="stable")
    take[order[:short]] += 1
    rng = np.random.default_rng(seed)
    test = []
    for c, k in zip(classes, take):
        idx = np.flatnonzero(labels == c)
        test.append(idx[rng.permutation(len(idx))[:k]])
    test_idx = np.sort(np.concatenate(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def load_digits_splits(*, max_per_class: int | None = None) -> DatasetSplits:
    """The digits dataset as ``DatasetSplits`` (see the module docstring for the split)."""
    max_per_class = check_max_per_class(max_per_class)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # scikit-learn is an optional dependency
        raise ImportError("the 'digits' dataset needs scikit-learn: pip install scikit-learn (or sparsam[cli])") from e
    bunch = load_digits()
    data = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images = np.rint(data * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED)

    def split(idx: np.ndarray) -> ArrayDataset:
        keep = idx[take_per_class(labels[idx].tolist(), max_per_class)]
        return ArrayDataset(torch.from_numpy(images[keep].copy()), torch.from_numpy(labels[keep].copy()))

    train, test = split(train_idx), split(test_idx)
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        name="digits",
        train=train,
        test=test,
        num_classes=10,
        in_channels=1,
        image_size=(8, 8),
        mean=mean,
        std=std,
        class_names=[str(i) for i in range(10)],
    )
