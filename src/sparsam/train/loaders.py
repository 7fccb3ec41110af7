"""The training engine's view of the data: loaders for train, test and the Fisher samples.

Two paths, both ending in iterables of ``(x, y)`` batches already on the device:

* in memory (digits, CIFAR, folders of small images):
  [`sparsam.data.DeviceLoader`][sparsam.data.DeviceLoader] cuts,
  normalises and augments whole batches on the device;
* streamed (folders of large images, e.g. ImageNet): a torch ``DataLoader`` over
  [`sparsam.data.ImageFolderStream`][sparsam.data.ImageFolderStream] decodes in worker processes and
  [`sparsam.data.to_device_batch`][sparsam.data.to_device_batch] normalises on the device.

Subsets (``--train-subset`` / ``--test-subset``) are drawn here, seeded by ``--subset-seed``;
for an image folder in memory only the chosen files are decoded. ``--label-noise`` changes a fixed
fraction of the training labels (after the subset, seeded by ``--subset-seed``).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import TrainConfig
from .errors import ConfigError, UserError


def _decode_workers(cfg: TrainConfig) -> int:
    """Processes that decode an image folder once: ``--workers``, at most the CPUs this process may use
    (more only adds start-up cost and a DataLoader warning). Decoding is deterministic either way;
    the streaming loader keeps ``--workers`` as given, since its epochs depend on that number."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(0, min(cfg.workers, cpus))


# Folders whose first image is at most this many pixels on a side are held in memory (auto mode).
MEMORY_MAX_SIDE = 64
# Streams of the derived seeds (see sparsam.data.device_loader.derive_seed).
_FISHER_STREAM = 7
_STREAM_SHUFFLE = 8
_LABEL_NOISE_STREAM = 9


@dataclass
class TrainData:
    """What the engine needs from the data.

    ``train`` and ``test`` yield ``(x, y)`` on the device and have ``set_epoch(e)`` and
    ``len()``; ``test`` is this rank's shard (disjoint shards, no padding). ``fisher`` is an
    iterable over training images without augmentation for Fisher masks (``set_epoch`` too).
    """

    name: str
    train: Any
    test: Any
    fisher: Any
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]
    train_size: int
    test_size: int
    augment: str
    mode: str  # "memory" or "stream"
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ subsets
def choose_subset(labels: Sequence[int] | np.ndarray, n: int, mode: str, seed: int, *, what: str) -> np.ndarray:
    """Sorted indices of an ``n``-element subset.

    The draw is [`sparsam.data.subset_indices`][sparsam.data.subset_indices]'s (``fill_short``):
    ``mode="balanced"``: ``n // C`` per class (the first ``n % C`` classes of a seeded class
    order get one more); a class with too few images gives all it has and the shortfall is
    drawn at random from the rest. ``mode="random"``: uniformly without replacement.

    A subset that leaves out classes of the full set (fewer images than classes, or a random draw
    that missed some) warns (``UserWarning``) naming how many are absent.
    """
    labels = np.asarray(labels)
    total = len(labels)
    if n > total:
        raise ConfigError(f"--{what}-subset {n} is larger than the {what} set ({total} images)")
    from ..data import subset_indices

    picked = subset_indices(labels, n, mode=mode, seed=seed)
    _warn_absent_classes(labels, picked, n, mode, what)
    return picked


def _warn_absent_classes(labels: np.ndarray, picked: np.ndarray, n: int, mode: str, what: str) -> None:
    """Warn when the subset ``picked`` of ``labels`` has no image of some class of the full set."""
    classes = np.unique(labels)
    absent = np.setdiff1d(classes, np.unique(labels[picked]))
    if len(absent) == 0:
        return
    shown = ", ".join(str(int(c)) for c in absent[:10]) + (", ..." if len(absent) > 10 else "")
    fix = (
        f"use --{what}-subset {len(classes)} or more"
        if n < len(classes)
        else f"use a larger --{what}-subset" + (" or --subset balanced" if mode == "random" else "")
    )
    warnings.warn(
        f"--{what}-subset {n} holds no image of {len(absent)} of the {len(classes)} classes (class {shown}): "
        f"the {'model trains' if what == 'train' else 'test accuracy is measured'} without them; {fix}",
        UserWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------------------------ augmentation
def resolve_augment(cfg: TrainConfig, kind: str) -> str:
    """The augmentation actually used: ``auto`` -> cifar (CIFAR), none (digits), crop-flip (folders)."""
    if cfg.augment != "auto":
        return cfg.augment
    return {"cifar10": "cifar", "cifar100": "cifar", "digits": "none"}.get(kind, "crop-flip")


def crop_fill(cfg: TrainConfig, mean: Sequence[float], std: Sequence[float]) -> list[float] | None:
    """The random crop's padding value per channel after normalisation: ``None`` (zero, the mean
    colour) for ``--crop-fill mean``; for ``black`` the value a black pixel gets, ``-mean / std``,
    computed as ``DeviceLoader`` normalises (float64 ratio, rounded to float32)."""
    if cfg.crop_fill == "mean":
        return None
    ratio = (torch.tensor(list(mean), dtype=torch.float64) / torch.tensor(list(std), dtype=torch.float64)).float()
    return (-ratio).tolist()


def augment_fn(
    cfg: TrainConfig, name: str, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
) -> Any:
    """The batched training augmentation ``name`` (see ``resolve_augment``); ``mean`` / ``std`` are
    the loader's normalisation, needed for ``--crop-fill black``."""
    from ..data import cifar_augment

    if name == "none":
        return None
    if name == "flip":
        return functools.partial(cifar_augment, crop_padding=0, cutout=0)
    fill = None
    if cfg.crop_fill != "mean":
        if mean is None or std is None:
            raise ValueError(f"--crop-fill {cfg.crop_fill} needs the normalisation's mean and std")
        fill = crop_fill(cfg, mean, std)
    if name == "crop-flip":
        return functools.partial(cifar_augment, crop_padding=cfg.crop_padding, cutout=0, crop_fill=fill)
    return functools.partial(
        cifar_augment, crop_padding=cfg.crop_padding, cutout=cfg.cutout, cutout_p=cfg.cutout_p, crop_fill=fill
    )


# ------------------------------------------------------------------------------------------ batch size
def batch_per_rank(cfg: TrainConfig, world_size: int) -> int:
    """Each process's batch per step. ``--batch-scope global`` (default): ``--batch-size`` is the
    whole step's batch, split over the ``world_size`` processes (it must divide evenly);
    ``per-process`` (the SSAM authors' ``--batch_size``): every process takes ``--batch-size``, so a
    step sees ``world_size`` times as many images. Either way the per-process batch must divide
    into ``--accum`` micro-batches."""
    if cfg.batch_scope == "per-process":
        per_rank = cfg.batch_size
    else:
        if cfg.batch_size % world_size:
            raise ConfigError(
                f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world_size}) "
                "(or pass --batch-scope per-process to give each process --batch-size images)"
            )
        per_rank = cfg.batch_size // world_size
    if per_rank % cfg.accum:
        raise ConfigError(f"the per-process batch ({per_rank}) must be divisible by --accum ({cfg.accum})")
    return per_rank


# ------------------------------------------------------------------------------------------ loading
def _first_image_side(root: str) -> tuple[int, str]:
    from PIL import Image

    from ..data.image_folder import find_split_dirs, list_classes, scan_split

    train_dir, _ = find_split_dirs(root)
    classes = list_classes(train_dir)
    files, _ = scan_split(train_dir, classes, max_per_class=1)
    if not files:
        raise UserError(f"--data {root}: no image files under {train_dir}")
    with Image.open(files[0]) as im:
        return max(im.size), im.mode


def _folder_subset_splits(cfg: TrainConfig) -> Any:
    """An image folder in memory, decoding only the files of the chosen subsets."""
    from ..data.dataset import ArrayDataset, DatasetSplits, channel_stats
    from ..data.image_folder import (
        damaged_message,
        decode_files,
        find_split_dirs,
        list_classes,
        scan_split,
        stack_images,
    )

    train_dir, test_dir = find_split_dirs(cfg.data)
    classes = list_classes(train_dir)
    picked: dict[str, tuple[list[str], list[int]]] = {}
    for split, folder, n in (("train", train_dir, cfg.train_subset), ("test", test_dir, cfg.test_subset)):
        files, labels = scan_split(folder, classes)
        if not files:
            raise UserError(f"--data {cfg.data}: no image files under {folder}")
        if n is not None:
            keep = choose_subset(labels, n, cfg.subset, cfg.subset_seed, what=split)
            files, labels = [files[i] for i in keep], [labels[i] for i in keep]
        picked[split] = (files, labels)
    n_train = len(picked["train"][0])
    files = picked["train"][0] + picked["test"][0]
    decoded, damaged = decode_files(files, num_workers=_decode_workers(cfg) if n_train > 2000 else 0)
    if damaged:  # truncated / corrupted files: an error naming the first, or left out (--skip-damaged)
        if not cfg.skip_damaged:
            raise UserError(f"--data {cfg.data}: {damaged_message(damaged, cfg.data)}")
        import warnings

        warnings.warn(
            f"skipped {len(damaged)} damaged image file(s) of {cfg.data} (first: {damaged[0][0]}: {damaged[0][1]})",
            stacklevel=2,
        )
        for split, lo, hi in (("train", 0, n_train), ("test", n_train, len(files))):
            fs, ys = picked[split]
            picked[split] = (
                [f for f, a in zip(fs, decoded[lo:hi]) if a is not None],
                [y for y, a in zip(ys, decoded[lo:hi]) if a is not None],
            )
        n_train = len(picked["train"][0])
        files = [f for f, a in zip(files, decoded) if a is not None]
    images, _ = stack_images(files, [a for a in decoded if a is not None])
    train = ArrayDataset(torch.from_numpy(images[:n_train].copy()), torch.tensor(picked["train"][1], dtype=torch.int64))
    test = ArrayDataset(torch.from_numpy(images[n_train:].copy()), torch.tensor(picked["test"][1], dtype=torch.int64))
    mean, std = channel_stats(train.images)
    return DatasetSplits(
        name=cfg.data,
        train=train,
        test=test,
        num_classes=len(classes),
        in_channels=train.images.shape[1],
        image_size=(train.images.shape[2], train.images.shape[3]),
        mean=mean,
        std=std,
        class_names=classes,
    )


def _subset_array(ds: Any, n: int | None, cfg: TrainConfig, what: str) -> Any:
    from ..data import ArrayDataset

    if n is None:
        return ds
    keep = torch.from_numpy(choose_subset(ds.labels.cpu().numpy(), n, cfg.subset, cfg.subset_seed, what=what))
    return ArrayDataset(ds.images[keep], ds.labels[keep])


# ------------------------------------------------------------------------------------------ label noise
def noisy_labels(labels: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Symmetric label noise: ``(new labels, sorted indices of the changed ones)``.

    Exactly ``round(fraction * len(labels))`` positions, drawn without replacement, get a class drawn
    uniformly from the ``num_classes - 1`` classes other than their own, so a changed label is
    never the true one. Deterministic in ``seed`` (a NumPy generator of its own; nothing else is
    consumed). ``labels`` is not modified.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"--label-noise must be a fraction in [0, 1), got {fraction!r}")
    if num_classes < 2:
        raise ConfigError(f"--label-noise needs at least 2 classes, got {num_classes}")
    n = len(labels)
    k = int(round(fraction * n))
    rng = np.random.default_rng([int(seed), _LABEL_NOISE_STREAM])
    idx = np.sort(rng.choice(n, size=k, replace=False))
    old = labels.cpu().numpy().astype(np.int64)
    shift = rng.integers(1, num_classes, size=k)  # 1..C-1: never the class itself
    new = old.copy()
    new[idx] = (old[idx] + shift) % num_classes
    return torch.from_numpy(new).to(labels.device, labels.dtype), torch.from_numpy(idx)


def build_data(
    cfg: TrainConfig,
    *,
    device: torch.device,
    rank: int = 0,
    world_size: int = 1,
    batch_per_rank: int,
) -> TrainData:
    """Load the data set named by ``cfg.data`` and build the loaders (see the module docstring)."""
    kind = cfg.data if cfg.data in ("digits", "cifar10", "cifar100") else "folder"
    mode = "memory"
    if kind == "folder":
        if cfg.folder_mode == "auto":
            side, _ = _first_image_side(cfg.data)
            mode = "memory" if side <= MEMORY_MAX_SIDE else "stream"
        else:
            mode = cfg.folder_mode
    if mode == "stream":
        return _build_stream(cfg, device=device, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank)
    return _build_memory(cfg, kind, device=device, rank=rank, world_size=world_size, batch_per_rank=batch_per_rank)


def _build_memory(
    cfg: TrainConfig, kind: str, *, device: torch.device, rank: int, world_size: int, batch_per_rank: int
) -> TrainData:
    from ..data import ArrayDataset, DeviceLoader, load_dataset
    from ..data.device_loader import derive_seed

    if kind == "folder" and (cfg.train_subset is not None or cfg.test_subset is not None):
        splits = _folder_subset_splits(cfg)
    else:
        folder_options: dict[str, Any] = {"skip_damaged": cfg.skip_damaged} if kind == "folder" else {}
        splits = load_dataset(
            cfg.data,
            root=cfg.data_root,
            download=cfg.download,
            num_workers=_decode_workers(cfg) if kind == "folder" else None,
            max_image_side=10**9 if cfg.folder_mode == "memory" else MEMORY_MAX_SIDE,
            **folder_options,
        )
        splits.train = _subset_array(splits.train, cfg.train_subset, cfg, "train")
        splits.test = _subset_array(splits.test, cfg.test_subset, cfg, "test")
    aug_name = resolve_augment(cfg, kind)
    flipped = 0
    if cfg.label_noise > 0:  # training labels only; the test set stays clean
        labels, changed = noisy_labels(splits.train.labels, cfg.label_noise, splits.num_classes, cfg.subset_seed)
        splits.train = ArrayDataset(splits.train.images, labels)
        flipped = len(changed)
    train_ds = splits.train.to(device)  # moved once; the loaders below share it
    if len(train_ds) // world_size < batch_per_rank:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (a step of {batch_per_rank * world_size} images) is larger than the "
            f"training set ({len(train_ds)} images{f' over {world_size} ranks' if world_size > 1 else ''}): no full batch per epoch"
        )
    if len(splits.test) == 0:
        raise UserError(f"--data {cfg.data}: the test split is empty")
    common: dict[str, Any] = dict(device=device, mean=splits.mean, std=splits.std, channels_last=cfg.channels_last)
    train = DeviceLoader(
        train_ds,
        batch_size=batch_per_rank,
        shuffle=True,
        drop_last=True,
        augment=augment_fn(cfg, aug_name, splits.mean, splits.std),
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        **common,
    )
    # Test: this rank's disjoint, unpadded shard (rank, rank + world_size, ...); sums are all-reduced.
    shard = ArrayDataset(splits.test.images[rank::world_size], splits.test.labels[rank::world_size])
    test = DeviceLoader(shard, batch_size=cfg.eval_batch_size, shuffle=False, drop_last=False, **common)
    # Fisher samples: the training images (augmented as for training with --fisher-augment, the
    # authors' choice), in an order of their own (seeded by (seed, epoch)), the same on every rank;
    # rank 0's mask is broadcast anyway.
    fisher = DeviceLoader(
        train_ds,
        batch_size=min(cfg.num_samples, 256),
        shuffle=True,
        drop_last=False,
        augment=augment_fn(cfg, aug_name, splits.mean, splits.std) if cfg.fisher_augment else None,
        seed=derive_seed(cfg.seed, _FISHER_STREAM),
        **common,
    )
    return TrainData(
        name=splits.name,
        train=train,
        test=test,
        fisher=fisher,
        num_classes=splits.num_classes,
        in_channels=splits.in_channels,
        image_size=tuple(splits.image_size),
        train_size=len(train_ds),
        test_size=len(splits.test),
        augment=aug_name,
        mode="memory",
        info={
            "mean": list(splits.mean),
            "std": list(splits.std),
            "class_names": list(splits.class_names),
            "label_noise_flipped": flipped,
        },
    )


# ------------------------------------------------------------------------------------------ streaming
class StreamLoader:
    """A DataLoader over an image stream, re-seeded per epoch, yielding normalised device batches.

    Shuffling: the epoch's order is ``randperm`` on a generator seeded from ``(seed, epoch)``, the
    same on every rank; rank r takes positions r, r + world_size, ... (``drop_last``: the order is
    cut to a multiple of ``world_size``). Worker RNG (random crops) is seeded from the same
    generator, so an epoch is reproducible for a fixed number of workers.
    """

    def __init__(
        self,
        dataset: Any,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
        seed: int,
        rank: int,
        world_size: int,
        workers: int,
        channels_last: bool,
    ) -> None:
        self.dataset, self.batch_size, self.shuffle, self.drop_last = dataset, batch_size, shuffle, drop_last
        self.device, self.mean, self.std, self.seed = device, list(mean), list(std), seed
        self.rank, self.world_size, self.workers, self.channels_last = rank, world_size, workers, channels_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        from ..data.device_loader import derive_seed

        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _STREAM_SHUFFLE))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            order = order[: (n // self.world_size) * self.world_size] if self.drop_last else order
            order = order[self.rank :: self.world_size]
        return order.tolist()

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        from torch.utils.data import DataLoader, Subset

        from ..data import to_device_batch
        from ..data.device_loader import derive_seed

        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, _STREAM_SHUFFLE, self.rank))
        loader = DataLoader(
            Subset(self.dataset, self._indices()),
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=self.drop_last,
            num_workers=self.workers,
            generator=g,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )
        from ..data import DamagedImageError

        batches = iter(loader)
        while True:
            try:
                x, y = next(batches)
            except StopIteration:
                return
            except DamagedImageError as e:  # one line naming the file, not a worker's traceback
                raise UserError(f"--data: {e}") from None
            yield to_device_batch(
                x,
                y,
                device=self.device,
                mean=self.mean,
                std=self.std,
                channels_last=self.channels_last,
                non_blocking=self.device.type == "cuda",
            )


def _build_stream(
    cfg: TrainConfig, *, device: torch.device, rank: int, world_size: int, batch_per_rank: int
) -> TrainData:
    from torch.utils.data import Subset

    from ..data import IMAGENET_MEAN, IMAGENET_STD, ImageFolderStream, RandomResizedCrop, ResizeCenterCrop
    from ..data.device_loader import derive_seed

    from ..data.image_folder import GRAY_MODES

    _, first_mode = _first_image_side(cfg.data)
    gray = first_mode in GRAY_MODES
    mode = "L" if gray else "RGB"
    mean = [sum(IMAGENET_MEAN) / 3] if gray else list(IMAGENET_MEAN)
    std = [sum(IMAGENET_STD) / 3] if gray else list(IMAGENET_STD)
    aug_name = "none" if cfg.augment == "none" else "random-resized-crop"
    train_tf = ResizeCenterCrop(cfg.image_size) if aug_name == "none" else RandomResizedCrop(cfg.image_size)
    skip = cfg.skip_damaged
    train_ds: Any = ImageFolderStream(cfg.data, split="train", transform=train_tf, mode=mode, skip_damaged=skip)
    test_ds: Any = ImageFolderStream(
        cfg.data, split="test", transform=ResizeCenterCrop(cfg.image_size), mode=mode, skip_damaged=skip
    )
    fisher_tf = train_tf if cfg.fisher_augment else ResizeCenterCrop(cfg.image_size)  # augmented: the authors'
    fisher_ds: Any = ImageFolderStream(cfg.data, split="train", transform=fisher_tf, mode=mode, skip_damaged=skip)
    classes = train_ds.class_names
    if cfg.label_noise > 0:
        raise ConfigError(
            "--label-noise needs the data in memory (CIFAR, digits, or a folder of small images "
            f"with --folder-mode memory), not a streamed folder ({cfg.data})"
        )
    if cfg.train_subset is not None:
        keep = choose_subset(train_ds.labels, cfg.train_subset, cfg.subset, cfg.subset_seed, what="train").tolist()
        train_ds, fisher_ds = Subset(train_ds, keep), Subset(fisher_ds, keep)
    if cfg.test_subset is not None:
        keep = choose_subset(test_ds.labels, cfg.test_subset, cfg.subset, cfg.subset_seed, what="test").tolist()
        test_ds = Subset(test_ds, keep)
    if len(train_ds) // world_size < batch_per_rank:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} (a step of {batch_per_rank * world_size} images) is larger than the "
            f"training set ({len(train_ds)} images)"
        )
    common: dict[str, Any] = dict(
        device=device, mean=mean, std=std, workers=cfg.workers, channels_last=cfg.channels_last
    )
    train = StreamLoader(
        train_ds,
        batch_size=batch_per_rank,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        **common,
    )
    test = StreamLoader(
        test_ds,
        batch_size=cfg.eval_batch_size,
        shuffle=False,
        drop_last=False,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        **common,
    )
    fisher = StreamLoader(
        fisher_ds,
        batch_size=min(cfg.num_samples, 64),
        shuffle=True,
        drop_last=False,
        seed=derive_seed(cfg.seed, _FISHER_STREAM),
        rank=0,
        world_size=1,
        **common,
    )
    return TrainData(
        name=os.path.abspath(cfg.data),
        train=train,
        test=test,
        fisher=fisher,
        num_classes=len(classes),
        in_channels=1 if gray else 3,
        image_size=(cfg.image_size, cfg.image_size),
        train_size=len(train_ds),
        test_size=len(test_ds),
        augment=aug_name,
        mode="stream",
        info={"mean": mean, "std": std, "class_names": list(classes)},
    )
