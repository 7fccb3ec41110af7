"""Wide residual networks (Zagoruyko & Komodakis, BMVC 2016, arXiv 1605.07146).

WRN-d-k: a 3x3 stem convolution to 16 channels, then three stages of ``(d - 4) / 6`` pre-activation
blocks (BN-ReLU-conv3x3-[dropout]-BN-ReLU-conv3x3) with widths 16k, 32k, 64k and strides 1, 2, 2,
then BN-ReLU, global average pooling and a linear classifier. A block whose shape changes gets a
1x1 convolution shortcut applied to the block's pre-activated input, as in the authors' code.
Convolutions have no bias.

``width`` scales the base 16: widths become ``width, width*k, 2*width*k, 4*width*k`` (default 16,
which gives the paper's network). At width 16 and 10 classes: WRN-16-4 has 2,748,890 parameters,
WRN-28-10 36,479,194.
"""

from __future__ import annotations

import re

import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_positive_int, conv1x1, conv3x3, init_weights

_WRN_NAME = re.compile(r"wrn(\d+)-(\d+)")


class PreActBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (no in-place operations, vmap-safe)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = conv1x1(in_ch, out_ch, stride)

    def forward(self, x: Tensor) -> Tensor:
        a = F.relu(self.bn1(x))
        out = self.conv1(a)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        # The projection shortcut sees the pre-activated input, the identity shortcut the raw input.
        return out + (x if self.shortcut is None else self.shortcut(a))


class WideResNet(nn.Module):
    """WRN-depth-k.

    Args:
        depth: total depth d; (d - 4) must be a positive multiple of 6.
        widen_factor: k.
        num_classes: outputs of the final linear layer.
        in_channels: input channels (1 for grayscale).
        width: the base width that the paper fixes at 16 (stem channels); stages have
            ``width*k``, ``2*width*k``, ``4*width*k`` channels.
        dropout: dropout probability between the two convolutions of each block (paper: 0 or 0.3).
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        width: int = 16,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_positive_int("depth", depth)
        check_positive_int("widen_factor", widen_factor)
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        check_positive_int("width", width)
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
        n = (depth - 4) // 6
        self.conv1 = conv3x3(in_channels, width)
        stages = []
        in_ch = width
        for i in range(3):
            out_ch = width * widen_factor * 2**i
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(in_ch, out_ch, 2 if (i > 0 and j == 0) else 1, float(dropout)))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_ch)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = F.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))


def parse_wrn_name(name: str) -> tuple[int, int] | None:
    """``"wrn28-10"`` -> ``(28, 10)``; ``None`` if ``name`` does not have the ``wrn{d}-{k}`` form."""
    m = _WRN_NAME.fullmatch(name)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2))


def wide_resnet(
    depth: int,
    widen_factor: int,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: int | None = None,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-depth-widen_factor; ``width`` scales the base 16 (default 16)."""
    return WideResNet(
        depth,
        widen_factor,
        num_classes=num_classes,
        in_channels=in_channels,
        width=16 if width is None else width,
        dropout=dropout,
    )
