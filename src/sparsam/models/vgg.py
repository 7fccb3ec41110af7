"""VGG-16 with BatchNorm for CIFAR-size inputs (Simonyan & Zisserman, ICLR 2015, arXiv 1409.1556;
BatchNorm after every convolution, Ioffe & Szegedy 2015).

The 13 convolutions of configuration D, each conv3x3 (no bias) - BN - ReLU, in five stages of
2, 2, 3, 3, 3 layers with widths w, 2w, 4w, 8w, 8w (w = 64 by default), each stage followed by a
2x2 max-pool, then global average pooling and one linear classifier (the CIFAR variant: no 4096-wide
fully connected layers). The max-pools use ``ceil_mode=True`` so that inputs as small as 8x8 (which
reach 1x1 after three pools) still work; on inputs whose sides are multiples of 32 this is the plain
max-pool.

The convolutions have no bias: a bias right before BatchNorm is cancelled by the batch mean, its
gradient is identically zero in training mode, and it would only pad parameter counts and masks.
At w = 64 and 10 classes: 14,724,042 parameters (14,728,266 in implementations that keep the
redundant conv biases).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._common import check_positive_int, conv3x3, init_weights

# Configuration D in units of the base width; "M" is a 2x2 max-pool.
_CFG_D: tuple[int | str, ...] = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")


class VGG(nn.Module):
    """VGG with BatchNorm and a single linear classifier.

    Args:
        cfg: layer configuration in units of ``width``; ``"M"`` is a max-pool.
        num_classes: outputs of the final linear layer.
        in_channels: input channels (1 for grayscale).
        width: channels of the first stage.
    """

    def __init__(
        self,
        cfg: tuple[int | str, ...] = _CFG_D,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        layers: list[nn.Module] = []
        ch = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            elif isinstance(v, int) and not isinstance(v, bool) and v > 0:
                out = width * v
                layers += [conv3x3(ch, out), nn.BatchNorm2d(out), nn.ReLU(inplace=False)]
                ch = out
            else:
                raise ValueError(f"VGG cfg entries must be positive ints or 'M', got {v!r} in {cfg!r}")
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> VGG:
    """CIFAR VGG-16-BN; ``width`` = first-stage channels (default 64)."""
    return VGG(_CFG_D, num_classes=num_classes, in_channels=in_channels, width=64 if width is None else width)
