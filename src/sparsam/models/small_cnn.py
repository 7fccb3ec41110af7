"""A small convolutional network for tiny grayscale images (scikit-learn's 8x8 digits, 28x28 MNIST).

conv3x3(in -> w) - BN - ReLU - 2x2 max-pool - conv3x3(w -> 2w) - BN - ReLU - adaptive average pool to
2x2 - linear(8w -> classes), w = 16 by default. Pooling to 2x2 rather than 1x1 keeps coarse position
information, which matters for digits. Works on any input of at least 4x4 (8x8 and up is the intended
range). At w = 16, 1 input channel and 10 classes: 6,138 parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_positive_int, conv3x3, init_weights


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU layers and a linear head.

    Args:
        num_classes: outputs of the final linear layer.
        in_channels: input channels (1 for grayscale).
        width: channels of the first convolution; the second has ``2 * width``.
    """

    def __init__(self, *, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        self.conv1 = conv3x3(in_channels, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, 2 * width)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(2 * width * 4, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), kernel_size=2, stride=2, ceil_mode=True)
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def smallcnn(*, num_classes: int = 10, in_channels: int = 3, width: int | None = None) -> SmallCNN:
    """SmallCNN; ``width`` = channels of the first convolution (default 16)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=16 if width is None else width)
