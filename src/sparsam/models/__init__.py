"""Image classification models for the training CLI and the benchmarks, built by name.

```python
from sparsam.models import create_model, list_models

model = create_model("resnet18", num_classes=10)           # CIFAR ResNet-18, 11.17M parameters
small = create_model("wrn16-4", width=4, num_classes=100)  # a narrower WRN-16-4
```

The Models and data guide has the architectures, what ``width`` means for each and the parameter
counts.
"""

from .registry import create_model, list_models
from .resnet_cifar import CifarResNet
from .resnet_imagenet import ImageNetResNet
from .small_cnn import SmallCNN
from .vgg import VGG
from .wide_resnet import WideResNet

__all__ = [
    "CifarResNet",
    "ImageNetResNet",
    "SmallCNN",
    "VGG",
    "WideResNet",
    "create_model",
    "list_models",
]
