"""The model registry: one name per architecture, used by the training CLI and the tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet_cifar import resnet18, resnet34
from .resnet_imagenet import resnet50
from .small_cnn import smallcnn
from .vgg import vgg16_bn
from .wide_resnet import parse_wrn_name, wide_resnet

ModelFactory = Callable[..., nn.Module]

# Fixed names. WRNs are also accepted as any ``wrn{depth}-{k}``; the two listed are the usual ones.
_REGISTRY: dict[str, ModelFactory] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "vgg16_bn": vgg16_bn,
    "smallcnn": smallcnn,
    "wrn16-4": lambda **kw: wide_resnet(16, 4, **kw),
    "wrn28-10": lambda **kw: wide_resnet(28, 10, **kw),
}


def list_models() -> list[str]:
    """Names accepted by [`create_model`][sparsam.models.create_model], sorted. Any
    ``wrn{depth}-{k}`` is accepted too."""
    return sorted(_REGISTRY)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int | None = None,
    **kw: Any,
) -> nn.Module:
    """Build a freshly initialised model by name.

    Args:
        name: one of [`list_models`][sparsam.models.list_models] or ``wrn{depth}-{k}``
            (depth = 6n + 4), case-insensitive.
        num_classes: outputs of the classifier.
        in_channels: input channels (3 for RGB, 1 for grayscale).
        width: the model's base width; ``None`` takes the published one. What it scales:

            - ``resnet18``, ``resnet34``, ``resnet50``: first-stage width w (default 64); stages have
              w, 2w, 4w, 8w channels (times 4 at Bottleneck outputs for ResNet-50).
            - ``wrn{d}-{k}``: the base 16 of the paper; stages have ``width*k``, ``2*width*k``, ``4*width*k``.
            - ``vgg16_bn``: first-stage channels (default 64); stages w, 2w, 4w, 8w, 8w.
            - ``smallcnn``: first convolution's channels (default 16); the second has 2 * width.
        **kw: architecture options: ``dropout`` (float, WRNs only). Anything else is a TypeError.

    Every model takes (N, in_channels, H, W) inputs with H, W >= 8 (global average pooling), returns
    (N, num_classes) logits, has no in-place operations (``torch.func.vmap`` and
    ``functional_call`` work, with BatchNorm in eval mode), and uses one initialisation
    (Kaiming-normal fan-out convolutions, BatchNorm
    weight 1 and bias 0, zero linear bias).

    Raises:
        ValueError: unknown name (the message lists the known ones) or a bad WRN depth.
        TypeError / ValueError: a non-positive or non-integer ``num_classes``, ``in_channels`` or ``width``.
    """
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {name!r}")
    key = name.strip().lower()
    common: dict[str, Any] = dict(num_classes=num_classes, in_channels=in_channels, width=width)
    factory = _REGISTRY.get(key)
    if factory is not None:
        return factory(**common, **kw)
    wrn = parse_wrn_name(key)
    if wrn is not None:
        depth, k = wrn
        if depth < 10 or (depth - 4) % 6 != 0 or k < 1:
            raise ValueError(
                f"model {name!r}: a WRN needs depth = 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...) "
                f"and widen factor k >= 1, got depth {depth} and k {k}"
            )
        return wide_resnet(depth, k, **common, **kw)
    known = ", ".join(list_models())
    raise ValueError(f"unknown model {name!r}; known models: {known}, and wrn{{depth}}-{{k}} with depth = 6n + 4")
