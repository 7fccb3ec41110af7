"""ResNet-50 for ImageNet-size inputs (He et al., CVPR 2016, arXiv 1512.03385).

A 7x7 stride-2 stem convolution, BatchNorm, ReLU and a 3x3 stride-2 max-pool, then four stages of
[3, 4, 6, 3] Bottleneck blocks (1x1 reduce, 3x3, 1x1 expand by 4) with inner widths w, 2w, 4w, 8w
(w = 64 by default), global average pooling and a linear classifier. A stage's stride sits on the
3x3 convolution of its first block (the variant often called "v1.5"; the paper puts it on the first
1x1, which has the same parameter count). Shortcuts that change shape are 1x1 conv + BN.

At w = 64 and 1000 classes: 25,557,032 parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_positive_int, conv1x1, conv3x3, init_weights


class Bottleneck(nn.Module):
    """1x1 - 3x3 - 1x1 residual block with expansion 4 (no in-place operations, vmap-safe)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ImageNetResNet(nn.Module):
    """ImageNet ResNet with Bottleneck blocks.

    Args:
        blocks: blocks per stage, ``(3, 4, 6, 3)`` for ResNet-50.
        num_classes: outputs of the final linear layer.
        in_channels: input channels (1 for grayscale).
        width: stem channels and inner width of the first stage; stage outputs are 4w, 8w, 16w, 32w.
    """

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        *,
        num_classes: int = 1000,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        stages = []
        in_ch = width
        for i, n in enumerate(blocks):
            planes = width * 2**i
            layers = []
            for j in range(n):
                layers.append(Bottleneck(in_ch, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet50(*, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> ImageNetResNet:
    """ImageNet ResNet-50; ``width`` = base width (default 64). Note the registry default of 10
    classes: pass ``num_classes=1000`` for ImageNet."""
    return ImageNetResNet(
        (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=64 if width is None else width
    )
