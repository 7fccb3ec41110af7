"""Batches cut, augmented and normalised on the device from an in-memory ``ArrayDataset``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .augment import Augment
from .dataset import ArrayDataset, DatasetSplits

_SHUFFLE_STREAM = 0
_AUGMENT_STREAM = 1


def derive_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integers (numpy's SeedSequence hash), e.g. (seed, epoch)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _check_stats(name: str, v: Sequence[float] | None, channels: int) -> Tensor | None:
    if v is None:
        return None
    t = torch.as_tensor(list(v), dtype=torch.float64)
    if t.dim() != 1 or t.numel() not in (1, channels):
        raise ValueError(f"{name} must have 1 or {channels} (channels) values, got {list(v)!r}")
    if name == "std" and bool((t <= 0).any()):
        raise ValueError(f"std must be positive, got {list(v)!r}")
    return t.expand(channels).clone()


def _affine(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> tuple[Tensor, Tensor]:
    """(scale, shift), float32 (1, C, 1, 1), with ``(x / 255 - mean) / std == x * scale - shift``."""
    m = _check_stats("mean", mean, channels)
    s = _check_stats("std", std, channels)
    m = torch.zeros(channels, dtype=torch.float64) if m is None else m
    s = torch.ones(channels, dtype=torch.float64) if s is None else s
    return (1.0 / (255.0 * s)).float().view(1, channels, 1, 1), (m / s).float().view(1, channels, 1, 1)


def to_device_batch(
    x: Tensor,
    y: Tensor,
    *,
    device: torch.device | str,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    non_blocking: bool = False,
) -> tuple[Tensor, Tensor]:
    """A uint8 batch (N, C, H, W) and its labels to ``device``, as ``((x / 255 - mean) / std, y)``.

    Meant for batches of a DataLoader over [`ImageFolderStream`][sparsam.data.ImageFolderStream]
    (use ``non_blocking=True`` with
    ``pin_memory=True``). ``mean`` / ``std`` per channel on the 0..1 scale (``None``: 0 / 1).
    """
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a batch of images (N, C, H, W), got {getattr(x, 'shape', type(x))}")
    scale, shift = _affine(mean, std, x.shape[1])
    x = x.to(device, non_blocking=non_blocking)
    y = y.to(device, dtype=torch.int64, non_blocking=non_blocking)
    out = x.float().mul_(scale.to(x.device)).sub_(shift.to(x.device)).to(dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out, y


class DeviceLoader:
    """Iterate ``(x, y)`` batches of an in-memory dataset, everything on ``device``.

    The dataset is moved to ``device`` once, at construction. Each batch is then, on the device:
    gather the batch's uint8 images by index -> float32 ``(x / 255 - mean) / std`` ->
    ``augment(x, generator=g)`` -> cast to ``dtype`` -> ``channels_last`` if asked. Labels are int64.
    Augmenting after normalising means augmentation's zero fill (crop padding, Cutout) is the mean
    colour. No host synchronisation happens while iterating.

    Order and sharding (like ``torch.utils.data.DistributedSampler``):

    - The permutation of epoch e is ``torch.randperm(N)`` on a CPU generator seeded from
      ``(seed, e)``: the same on every rank and every device. ``shuffle=False`` uses 0..N-1.
    - With ``world_size > 1`` the order is first made a multiple of ``world_size`` long, by dropping
      its tail (``drop_last=True``) or repeating its head (``drop_last=False``; a few samples are then
      seen twice per epoch, which slightly biases an evaluation), and rank r takes positions
      r, r + world_size, ...: disjoint shards of equal length.
    - The shard is cut into batches of ``batch_size``; a last, smaller batch is dropped iff
      ``drop_last``. ``len(loader)`` is the number of batches.
    - The augmentation generator lives on ``device`` and is seeded from ``(seed, epoch, rank)`` at the
      start of every pass.

    Call [`set_epoch`][sparsam.data.DeviceLoader.set_epoch] before each epoch: iterating twice
    without it repeats the same epoch,
    batch for batch. Given (seed, epoch, rank, world_size), the batches are deterministic.

    Args:
        dataset: the images (uint8) and labels.
        batch_size: samples per batch (per rank).
        shuffle: reshuffle every epoch.
        drop_last: drop the last incomplete batch (and shorten shards rather than pad them).
        device: where the data lives and batches are produced.
        mean, std: per-channel normalisation on the 0..1 scale (``None``: 0 and 1, i.e. x / 255).
        augment: ``augment(x, generator=g) -> x``, batched, e.g. [`cifar_augment`][sparsam.data.cifar_augment].
        seed: base seed for shuffling and augmentation.
        rank, world_size: this process's position among data-parallel processes.
        channels_last: return ``x`` in channels-last memory format.
        dtype: floating dtype of ``x``.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        *,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: Augment | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(dataset, ArrayDataset):
            raise TypeError(f"dataset must be an ArrayDataset, got {type(dataset).__name__}")
        for name, v, lo in (("batch_size", batch_size, 1), ("world_size", world_size, 1), ("rank", rank, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size ({world_size}), got {rank!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        for name, v in (("shuffle", shuffle), ("drop_last", drop_last), ("channels_last", channels_last)):
            if not isinstance(v, bool):
                raise TypeError(f"{name} must be a bool, got {v!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be callable or None, got {augment!r}")
        # Normalisation as x * scale - shift: two in-place ops per batch.
        scale, shift = _affine(mean, std, dataset.images.shape[1])
        self.device = torch.device(device)
        self.dataset = dataset.to(self.device)
        self._scale, self._shift = scale.to(self.device), shift.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle and augmentation the next pass uses."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        """Samples in this rank's shard per epoch (before batching)."""
        n = len(self.dataset)
        if self.world_size == 1:
            return n
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def indices(self) -> Tensor:
        """This rank's sample indices for the current epoch, in order (int64, on the CPU)."""
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _SHUFFLE_STREAM))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self.num_samples * self.world_size
            if total <= n:
                order = order[:total]
            elif n > 0:
                reps = -(-total // n)
                order = order.repeat(reps)[:total]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        # The only host-to-device copy of the pass: this epoch's indices, once.
        order = self.indices().to(self.device)
        generator = None
        if self.augment is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(derive_seed(self.seed, self.epoch, _AUGMENT_STREAM, self.rank))
        images, labels = self.dataset.images, self.dataset.labels
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            x = images.index_select(0, idx).float().mul_(self._scale).sub_(self._shift)
            if self.augment is not None:
                x = self.augment(x, generator=generator)
            x = x.to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, labels.index_select(0, idx)

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(n={len(self.dataset)}, batch_size={self.batch_size}, batches={len(self)}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, device={self.device}, "
            f"rank={self.rank}/{self.world_size})"
        )


def make_loaders(
    splits: DatasetSplits,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    augment: Augment | None = None,
    eval_batch_size: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[DeviceLoader, DeviceLoader]:
    """(train loader, test loader) normalised with ``splits.mean`` / ``splits.std``.

    Train: shuffled, ``augment`` applied, ``drop_last=True`` (every step sees a full batch, which
    keeps shapes static for ``torch.compile``). Test: in order, no augmentation, ``drop_last=False``,
    batches of ``eval_batch_size`` (default ``batch_size``).
    """
    loader = partial(
        DeviceLoader,
        device=device,
        mean=splits.mean,
        std=splits.std,
        seed=seed,
        rank=rank,
        world_size=world_size,
        channels_last=channels_last,
        dtype=dtype,
    )
    train = loader(splits.train, batch_size=batch_size, shuffle=True, drop_last=True, augment=augment)
    test = loader(
        splits.test,
        batch_size=batch_size if eval_batch_size is None else eval_batch_size,
        shuffle=False,
        drop_last=False,
    )
    return train, test
