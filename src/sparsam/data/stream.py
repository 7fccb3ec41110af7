"""Large image folders (ImageNet) streamed from disk: a torch Dataset that decodes with Pillow.

Use with a ``torch.utils.data.DataLoader`` (workers decode and transform) and move each uint8 batch
to the device with ``sparsam.data.to_device_batch``, which normalises there. The transforms
return uint8 (C, H, W) tensors; normalisation happens on the device, in batches.

Randomness comes from ``torch``'s global generator, which a DataLoader seeds per worker from its own
``generator`` argument: give the DataLoader a seeded generator for reproducible augmentation.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .image_folder import DamagedImageError, _reason, check_classes, find_split_dirs, list_classes, scan_split

if TYPE_CHECKING:  # Pillow is an optional dependency, imported where an image is decoded
    from PIL.Image import Image as PILImage

# The usual ImageNet normalisation constants (per-channel mean / std of the ImageNet train set, 0..1).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""The usual per-channel RGB mean of ImageNet on the 0..1 scale, for streamed folders."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""The usual per-channel RGB standard deviation of ImageNet on the 0..1 scale."""

Transform = Callable[[Any], Tensor]  # Pillow image -> uint8 (C, H, W); PIL is imported lazily


def pil_to_uint8(im: object) -> Tensor:
    """A Pillow image as a uint8 (C, H, W) tensor (RGB or L mode expected)."""
    arr = np.array(im, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def _check_pil(im: object) -> PILImage:
    """``im``, checked to be a Pillow image."""
    from PIL import Image

    if not isinstance(im, Image.Image):
        raise TypeError(f"expected a Pillow image, got {type(im).__name__}")
    return im


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


class RandomResizedCrop:
    """Random-area, random-aspect crop resized to ``size`` x ``size``, then a horizontal flip with
    probability ``flip_p``; returns uint8 (C, H, W).

    The crop (the Inception-style augmentation of Szegedy et al. 2015): area fraction uniform in
    ``scale``, log-aspect-ratio uniform in log(``ratio``); up to 10 tries to fit the image, else the
    largest centred crop whose aspect ratio is clamped into ``ratio``. Resizing is bilinear (Pillow,
    with its antialiasing on downscale).
    """

    def __init__(
        self,
        size: int,
        *,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        flip_p: float = 0.5,
    ) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p!r}")
        self.size, self.scale, self.ratio, self.flip_p = size, scale, ratio, flip_p

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, crop width, crop height) for an image of the given size."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()))
                top = int(torch.randint(0, height - h + 1, ()))
                return left, top, w, h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, im: object) -> Tensor:
        from PIL import Image

        im = _check_pil(im)
        left, top, w, h = self.box(*im.size)
        out = im.resize((self.size, self.size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if float(torch.rand(())) < self.flip_p:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_uint8(out)


class ResizeCenterCrop:
    """Resize the shorter side to ``resize`` (bilinear), then crop the centre ``size`` x ``size``;
    the usual evaluation transform (256 -> 224 for ImageNet). Returns uint8 (C, H, W)."""

    def __init__(self, size: int, *, resize: int | None = None) -> None:
        resize = round(size * 256 / 224) if resize is None else resize
        for name, v in (("size", size), ("resize", resize)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if resize < size:
            raise ValueError(f"resize ({resize}) must be >= size ({size})")
        self.size, self.resize = size, resize

    def __call__(self, im: object) -> Tensor:
        from PIL import Image

        im = _check_pil(im)
        w, h = im.size
        s = self.resize / min(w, h)
        nw, nh = max(self.size, round(w * s)), max(self.size, round(h * s))
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - self.size) // 2, (nh - self.size) // 2
        return pil_to_uint8(im.crop((left, top, left + self.size, top + self.size)))


class ImageFolderStream(Dataset):
    """One split of an ImageNet-layout folder, decoded image by image (for large images).

    Args:
        root: folder holding ``train/`` and ``test/`` or ``val/`` (classes = sorted sub-folders of
            ``train/``, as in [`load_dataset`][sparsam.data.load_dataset]).
        split: ``"train"`` or ``"test"`` (``"test"`` reads ``test/``, else ``val/``).
        transform: Pillow image -> uint8 (C, H, W) tensor; default
            [`RandomResizedCrop`][sparsam.data.RandomResizedCrop] (224) for train and
            [`ResizeCenterCrop`][sparsam.data.ResizeCenterCrop] (224) for test.
        mode: Pillow mode every image is converted to before the transform (``"RGB"`` or ``"L"``).
        max_per_class: keep the first n files (sorted names) of each class.
        skip_damaged: a file that cannot be decoded is replaced by the next readable file of the
            split (with a warning naming it), so an epoch keeps its length; otherwise reading it
            raises [`DamagedImageError`][sparsam.data.DamagedImageError] naming the file.

    ``dataset[i]`` is ``(uint8 tensor (C, H, W), label)``. Attributes: ``class_names``,
    ``files``, ``labels``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        split: str = "train",
        transform: Transform | None = None,
        mode: str = "RGB",
        max_per_class: int | None = None,
        skip_damaged: bool = False,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if mode not in ("RGB", "L"):
            raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
        train_dir, test_dir = find_split_dirs(root)
        self.class_names: list[str] = list_classes(train_dir)
        self.files, self.labels = scan_split(
            train_dir if split == "train" else test_dir, self.class_names, max_per_class=max_per_class
        )
        if split == "train":
            check_classes(train_dir, self.class_names, self.labels)
        if not isinstance(skip_damaged, bool):
            raise TypeError(f"skip_damaged must be a bool, got {skip_damaged!r}")
        self.skip_damaged = skip_damaged
        self.mode = mode
        if transform is None:
            transform = RandomResizedCrop(224) if split == "train" else ResizeCenterCrop(224)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def _open(self, index: int) -> Any:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            return im.convert(self.mode)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        for k in range(len(self.files)):
            i = (index + k) % len(self.files)
            try:
                im = self._open(i)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - Pillow: OSError, SyntaxError, ValueError, DecompressionBomb...
                reason = _reason(e)
                if not self.skip_damaged:
                    raise DamagedImageError(
                        f"damaged image file {self.files[i]}: {reason}; remove or replace it, or pass "
                        "skip_damaged=True (sparsam train: --skip-damaged)",
                        [(self.files[i], reason)],
                    ) from None
                warnings.warn(f"skipping damaged image file {self.files[i]}: {reason}", stacklevel=2)
                continue
            return self.transform(im), self.labels[i]
        raise DamagedImageError(f"no image of {len(self.files)} in this split can be decoded")
