"""Data for training: in-memory datasets cut into batches on the device, and streamed image folders.

Small datasets (digits, CIFAR, folders of small images) are held as a uint8 tensor (N, C, H, W) and
int64 labels ([`ArrayDataset`][sparsam.data.ArrayDataset]), moved to the device once;
[`DeviceLoader`][sparsam.data.DeviceLoader] gathers, normalises and augments
([`cifar_augment`][sparsam.data.cifar_augment]) whole batches there. Large image folders stream
through a torch DataLoader over [`ImageFolderStream`][sparsam.data.ImageFolderStream].

```python
from sparsam.data import load_dataset, make_loaders, cifar_augment

splits = load_dataset("cifar10", download=True)
train, test = make_loaders(splits, batch_size=128, device="cuda", augment=cifar_augment)
for epoch in range(200):
    train.set_epoch(epoch)
    for x, y in train:
        ...
```

The Models and data guide has the details.
"""

from .augment import Augment, cifar_augment, cutout, random_crop, random_flip
from .cifar import DatasetNotFoundError
from .dataset import ArrayDataset, DatasetSplits, channel_stats, random_subset, subset_indices
from .device_loader import DeviceLoader, make_loaders, to_device_batch
from .image_folder import DamagedImageError, default_cache_dir, folder_image_size
from .sources import DATASET_NAMES, load_dataset
from .stream import IMAGENET_MEAN, IMAGENET_STD, ImageFolderStream, RandomResizedCrop, ResizeCenterCrop

__all__ = [
    "DATASET_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ArrayDataset",
    "Augment",
    "DamagedImageError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "DeviceLoader",
    "ImageFolderStream",
    "RandomResizedCrop",
    "ResizeCenterCrop",
    "channel_stats",
    "cifar_augment",
    "cutout",
    "default_cache_dir",
    "folder_image_size",
    "load_dataset",
    "make_loaders",
    "random_crop",
    "random_flip",
    "random_subset",
    "subset_indices",
    "to_device_batch",
]
