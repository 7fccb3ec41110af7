"""Batched data augmentation on the device: random crop, horizontal flip, Cutout.

Every function takes a whole batch ``x`` of shape (N, C, H, W) (any dtype: uint8, or float before
or after normalisation) and an explicit ``torch.Generator`` on ``x``'s device, draws all its random
numbers for the batch in a few calls, and does no per-image Python work. The output has ``x``'s
shape, dtype and device. Zero is the fill value of Cutout and, unless ``fill`` is given, of the
crop's padding: in ``DeviceLoader``, which augments after normalising, zero is the dataset's mean
colour (``fill`` = the normalised black, ``-mean / std``, pads with black as torchvision's
``RandomCrop`` does on the raw image).

The draws, in this order, define the result for a given generator state (tests rely on it):

- ``random_crop``: ``torch.randint(0, 2p + 1, (2, N))`` -> rows 0/1 = vertical/horizontal
  offsets into the zero-padded image.
- ``random_flip``: ``torch.rand(N) < p`` -> which images are flipped left-right.
- ``cutout``: ``torch.rand(N) < p`` (which images get a square), then
  ``torch.randint(0, H, (N,))`` and ``torch.randint(0, W, (N,))`` (the centres).

A draw that an option switches off (``padding=0``, ``flip=False``, ``cutout=0``) is skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Augment = Callable[..., Tensor]
"""``augment(x, generator=g) -> x'``: the signature [`DeviceLoader`][sparsam.data.DeviceLoader] calls."""


def _check_batch(x: Tensor) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        desc = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else repr(type(x))
        raise ValueError(f"expected a batch of images (N, C, H, W), got {desc}")


def _check_prob(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _check_nonneg_int(name: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def random_crop(
    x: Tensor, *, padding: int, generator: torch.Generator | None = None, fill: Sequence[float] | None = None
) -> Tensor:
    """Pad each image by ``padding`` pixels on every side and crop an (H, W) window at a random
    offset, independently per image (a random translation by up to ``padding`` pixels).

    The padding is zero, or ``fill``: one value per channel (e.g. the normalised black).

    Done for the whole batch with one gather: output pixel (n, c, i, j) is padded pixel
    (n, c, i + dy[n], j + dx[n]), offsets dy, dx uniform in {0, ..., 2 * padding}.
    """
    _check_batch(x)
    _check_nonneg_int("padding", padding)
    if padding == 0 or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=x.device)
    if fill is None:
        padded = F.pad(x, (padding, padding, padding, padding))
    else:
        values = torch.as_tensor(list(fill), dtype=x.dtype, device=x.device)
        if values.shape != (c,):
            raise ValueError(f"fill must hold one value per channel ({c}), got {list(fill)!r}")
        padded = values.view(1, c, 1, 1).expand(n, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = offsets[0][:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)  # (N, W)
    # Advanced indices separated by a slice put their broadcast shape (N, H, W) first: (N, H, W, C).
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous(memory_format=torch.contiguous_format)


def random_flip(x: Tensor, *, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Flip each image left-right with probability ``p``, independently."""
    _check_batch(x)
    _check_prob("p", p)
    if x.shape[0] == 0:
        return x
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def cutout(x: Tensor, *, size: int = 16, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Cutout (DeVries & Taylor 2017, arXiv 1708.04552): with probability ``p`` per image, set a
    ``size`` x ``size`` square to zero (all channels).

    The centre (cy, cx) is uniform over all pixels, so the square may stick out of the image and is
    clipped at the borders: rows ``[cy - size // 2, cy - size // 2 + size)`` intersected with
    ``[0, H)``, columns likewise. (The paper's code, for even sizes, covers the same rows.)
    """
    _check_batch(x)
    _check_nonneg_int("size", size)
    _check_prob("p", p)
    n, _, h, w = x.shape
    if size == 0 or n == 0:
        return x
    apply = torch.rand(n, generator=generator, device=x.device) < p
    cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device)
    c = torch.arange(w, device=x.device)
    in_rows = (r >= top[:, None]) & (r < top[:, None] + size)  # (N, H)
    in_cols = (c >= left[:, None]) & (c < left[:, None] + size)  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # (N, H, W)
    return x.masked_fill(mask[:, None], 0)


_cutout = cutout  # cifar_augment's ``cutout`` argument shadows the function's name


def cifar_augment(
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    crop_padding: int = 4,
    flip: bool = True,
    cutout: int = 16,
    cutout_p: float = 0.5,
    crop_fill: Sequence[float] | None = None,
) -> Tensor:
    """The CIFAR augmentation of the SAM and SSAM papers, batched: random crop with ``crop_padding``
    pixels of padding (zero, or ``crop_fill`` per channel), horizontal flip with p = 0.5, then Cutout
    of a ``cutout`` x ``cutout`` square with probability ``cutout_p`` (``cutout=0`` switches it off).
    Works on uint8 or float batches.

    Use ``functools.partial(cifar_augment, cutout=0)`` and the like to change the options for
    [`DeviceLoader`][sparsam.data.DeviceLoader].
    """
    if not isinstance(flip, bool):
        raise TypeError(f"flip must be a bool, got {flip!r}")
    x = random_crop(x, padding=crop_padding, generator=generator, fill=crop_fill)
    if flip:
        x = random_flip(x, p=0.5, generator=generator)
    return _cutout(x, size=cutout, p=cutout_p, generator=generator)
