"""In-memory image datasets: uint8 images and int64 labels, plus what a training run needs to know."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"


class ArrayDataset:
    """A labelled image dataset held as two tensors.

    Args:
        images: uint8 tensor (N, C, H, W), values 0..255.
        labels: int64 tensor (N,), class indices.

    ``dataset[i]`` is ``(images[i], labels[i])``, so it also works as a torch ``Dataset``; for
    training, [`DeviceLoader`][sparsam.data.DeviceLoader] cuts whole batches on the device instead.
    """

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if not isinstance(images, Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor of shape (N, C, H, W), got {_describe(images)}")
        if not isinstance(labels, Tensor) or labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"labels must be an int64 tensor of shape (N,), got {_describe(labels)}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images and labels differ in length: {images.shape[0]} vs {labels.shape[0]}")
        if images.device != labels.device:
            raise ValueError(f"images and labels are on different devices: {images.device} vs {labels.device}")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same data on ``device`` (``self`` if it is already there)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        return ArrayDataset(self.images.to(device), self.labels.to(device))

    def subset(self, indices: Tensor | Sequence[int]) -> ArrayDataset:
        """The samples at ``indices`` (in that order), as a new dataset (copies)."""
        idx = torch.as_tensor(indices, dtype=torch.int64, device=self.images.device)
        if idx.dim() != 1:
            raise ValueError(f"indices must be one-dimensional, got shape {tuple(idx.shape)}")
        return ArrayDataset(self.images.index_select(0, idx), self.labels.index_select(0, idx))

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ArrayDataset(n={n}, channels={c}, size={h}x{w}, device={self.device})"


@dataclass
class DatasetSplits:
    """A train and a test split and their metadata, as returned by [`load_dataset`][sparsam.data.load_dataset].

    Attributes:
        name: what was loaded (``"cifar10"``, ``"digits"`` or the folder's absolute path).
        train: the training split.
        test: the test (or validation) split.
        num_classes: number of classes (length of ``class_names``).
        in_channels: 1 (grayscale) or 3 (RGB).
        image_size: (H, W).
        mean: per-channel mean of the train split's pixels, on the 0..1 scale.
        std: per-channel standard deviation (population, over every pixel of the train split), 0..1 scale.
        class_names: names in label order (label i is ``class_names[i]``).
    """

    name: str
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str]


def channel_stats(images: Tensor, *, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and population standard deviation of uint8 images (N, C, H, W), 0..1 scale.

    Exact: sums of values and squares of integer pixels are accumulated in float64 (exact up to
    2**53, far above any image dataset), in chunks of ``chunk`` images to bound memory.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("cannot compute channel statistics of an empty dataset")
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = images[i : i + chunk].to(device="cpu", dtype=torch.float64)
        s += x.sum(dim=(0, 2, 3))
        s2 += x.square().sum(dim=(0, 2, 3))
    count = n * h * w
    mean = s / count
    var = (s2 / count - mean.square()).clamp_min(0.0)
    return (mean / 255.0).tolist(), (var.sqrt() / 255.0).tolist()


SUBSET_MODES: tuple[str, ...] = ("balanced", "random")
"""How a subset is drawn: the same number per class, or uniformly at random (``mode=`` below)."""


def subset_indices(
    labels: Sequence[int] | np.ndarray, n: int, *, mode: str = "balanced", seed: int = 0, fill_short: bool = True
) -> np.ndarray:
    """Sorted indices of a seeded ``n``-element subset of a dataset with these ``labels``: the one rule
    behind [`random_subset`][sparsam.data.random_subset] and ``sparsam train --train-subset/--test-subset``.

    ``mode="random"``: ``n`` indices uniformly without replacement.
    ``mode="balanced"``: ``n // C`` of each of the C classes present, one more for the first ``n % C``
    classes of a seeded class order. A class with fewer samples than its share gives all it has; with
    ``fill_short`` the shortfall is drawn at random from the other classes' remaining samples,
    without it the subset is a ValueError.
    Draws come from ``numpy.random.default_rng(seed)``, so a subset depends only on
    (labels, n, mode, seed).
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 <= n <= total:
        raise ValueError(f"subset size must be in [0, {total}], got {n}")
    if mode not in SUBSET_MODES:
        raise ValueError(f"subset mode must be 'balanced' or 'random', got {mode!r}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if mode == "random":
        return np.sort(rng.permutation(total)[:n])
    classes = np.unique(labels)
    quota = np.full(len(classes), n // len(classes))
    quota[rng.permutation(len(classes))[: n % len(classes)]] += 1
    chosen: list[np.ndarray] = []
    rest: list[np.ndarray] = []
    for c, q in zip(classes, quota):
        idx = np.flatnonzero(labels == c)
        if q > len(idx) and not fill_short:
            raise ValueError(f"balanced subset of {n} needs {q} samples of class {c}, which has {len(idx)}")
        idx = idx[rng.permutation(len(idx))]
        chosen.append(idx[:q])
        rest.append(idx[q:])
    picked = np.concatenate(chosen)
    short = n - len(picked)
    if short > 0:
        pool = np.concatenate(rest)
        picked = np.concatenate([picked, pool[rng.permutation(len(pool))[:short]]])
    return np.sort(picked)


def random_subset(dataset: ArrayDataset, n: int, *, mode: str = "balanced", seed: int = 0) -> ArrayDataset:
    """A seeded subset of ``n`` samples, kept in dataset order: the samples
    [`subset_indices`][sparsam.data.subset_indices] picks, with a class that has too few samples
    for its share of a balanced subset a ValueError (``fill_short=False``).

    ``mode="random"``: ``n`` samples uniformly without replacement.
    ``mode="balanced"``: ``n // C`` samples of each of the C classes present, and one more for
    ``n % C`` classes chosen at random.
    """
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= len(dataset):
        raise ValueError(f"subset size must be an int in [1, {len(dataset)}], got {n!r}")
    keep = subset_indices(dataset.labels.cpu().numpy(), n, mode=mode, seed=seed, fill_short=False)
    return dataset.subset(torch.from_numpy(keep))


def take_per_class(labels: Sequence[int] | Tensor, max_per_class: int | None) -> list[int]:
    """Indices of the first ``max_per_class`` samples of each class, in dataset order (all if None)."""
    labels_list = labels.tolist() if isinstance(labels, Tensor) else list(labels)
    if max_per_class is None:
        return list(range(len(labels_list)))
    counts: dict[int, int] = {}
    keep = []
    for i, y in enumerate(labels_list):
        if counts.get(y, 0) < max_per_class:
            counts[y] = counts.get(y, 0) + 1
            keep.append(i)
    return keep


def check_max_per_class(max_per_class: int | None) -> int | None:
    if max_per_class is None:
        return None
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 1:
        raise ValueError(f"max_per_class must be a positive int or None, got {max_per_class!r}")
    return max_per_class
