"""ResNet-18/34 for CIFAR-size inputs (He et al., CVPR 2016, arXiv 1512.03385).

The variant the SAM (Foret et al. 2021) and SSAM (Mi et al. 2022) papers train on CIFAR: the
ImageNet ResNet's four stages of BasicBlocks, but a 3x3 stride-1 stem convolution and no max-pool,
so a 32x32 input reaches the last stage at 4x4. Stage widths w, 2w, 4w, 8w (w = 64 by default);
stage strides 1, 2, 2, 2. A block whose shape changes gets a 1x1 convolution + BatchNorm
shortcut (He et al.'s option B). Global average pooling makes any input of at least 8x8 work.

At w = 64 and 10 classes: ResNet-18 has 11,173,962 parameters, ResNet-34 21,282,122.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_positive_int, conv1x1, conv3x3, init_weights


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection; ReLU after the sum (post-activation).

    No in-place operations, so the block works under ``torch.func.vmap``.
    """

    expansion = 1

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with BasicBlocks.

    Args:
        blocks: number of blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: outputs of the final linear layer.
        in_channels: input channels (1 for grayscale).
        width: channels of the stem and first stage, ``w``; stages have w, 2w, 4w, 8w.
    """

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 64,
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        in_ch = width
        for i, n in enumerate(blocks):
            out_ch = width * 2**i
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_ch, out_ch, stride=2 if (i > 0 and j == 0) else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(*, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> CifarResNet:
    """CIFAR ResNet-18: BasicBlocks [2, 2, 2, 2]; ``width`` = first-stage channels (default 64)."""
    w = 64 if width is None else width
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels, width=w)


def resnet34(*, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> CifarResNet:
    """CIFAR ResNet-34: BasicBlocks [3, 4, 6, 3]; ``width`` = first-stage channels (default 64)."""
    w = 64 if width is None else width
    return CifarResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, width=w)
