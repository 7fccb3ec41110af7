"""Helpers shared by the model definitions: argument checks and weight initialisation."""

from __future__ import annotations

from torch import nn

from .._checks import check_positive_int as check_positive_int  # re-exported for the model files


def init_weights(model: nn.Module) -> None:
    """The initialisation every model here uses.

    - Conv weights: Kaiming (He et al. 2015) normal, ``mode="fan_out"``, gain for ReLU, i.e.
      std = sqrt(2 / (C_out * k * k)); conv biases (where present) zero.
    - BatchNorm: weight 1, bias 0.
    - Linear: PyTorch's default weight init (uniform in +-1/sqrt(fan_in)), bias 0.

    Running on the ``meta`` device the calls are no-ops, so counting parameters of a full-width
    model under ``with torch.device("meta"):`` costs nothing.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (every one here is followed by a normalisation layer)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)
