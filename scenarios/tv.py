"""`torchvision`: CIFAR-10/100, MNIST, Fashion-MNIST and SVHN through `torchvision.datasets`.

The images are taken from the data set's in-memory arrays (no PIL round trip per item). Nothing is
downloaded unless `download: true`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets

from .arrays import ArrayImages, to_nchw
from .base import ImageSource
from .stream import register_source

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How to read one torchvision data set."""

    cls_name: str  # attribute of torchvision.datasets
    split_kw: str  # "train" (bool) or "split" ("train" / "test")
    targets_attr: str
    channels_first: bool  # SVHN stores N x C x H x W
    flip: bool


TORCHVISION_DATASETS = {
    "cifar10": TorchvisionSpec("CIFAR10", "train", "targets", False, True),
    "cifar100": TorchvisionSpec("CIFAR100", "train", "targets", False, True),
    "mnist": TorchvisionSpec("MNIST", "train", "targets", False, False),
    "fashion_mnist": TorchvisionSpec("FashionMNIST", "train", "targets", False, True),
    "svhn": TorchvisionSpec("SVHN", "split", "labels", True, False),
}


def _open(spec: TorchvisionSpec, root: Path, train: bool, download: bool, dataset: str) -> Any:
    cls = getattr(torchvision.datasets, spec.cls_name)
    split = {"train": train} if spec.split_kw == "train" else {"split": "train" if train else "test"}
    try:
        return cls(root=str(root), download=download, **split)
    except RuntimeError as err:
        if download:
            raise
        raise ValueError(
            f"{dataset} not found under root {str(root)!r}; set `download: true` to download it "
            f"there, or point `root` at an existing copy ({err})"
        ) from err


def _arrays(ds: Any, spec: TorchvisionSpec, what: str) -> tuple[torch.Tensor, np.ndarray]:
    images = torch.as_tensor(np.asarray(ds.data))
    images = images if spec.channels_first else to_nchw(images, what)
    targets = np.asarray(getattr(ds, spec.targets_attr), dtype=np.int64)
    return images, targets


@register_source("torchvision")
def load_torchvision(dataset: str, root: str = "data", download: bool = False) -> ImageSource:
    """A torchvision data set with its official train/test split.

    Args:
        dataset: one of cifar10, cifar100, mnist, fashion_mnist, svhn.
        root: the folder torchvision reads (and downloads into).
        download: download the data when it is absent.
    """
    if dataset not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {dataset!r}; valid: {', '.join(TORCHVISION_DATASETS)}")
    spec = TORCHVISION_DATASETS[dataset]
    base = Path(root).expanduser()
    if not download and not base.is_dir():
        raise ValueError(
            f"{dataset} not found: root {str(base)!r} does not exist; set `download: true` to download it"
        )
    train_ds = _open(spec, base, True, download, dataset)
    test_ds = _open(spec, base, False, download, dataset)
    x_train, y_train = _arrays(train_ds, spec, f"{dataset} train images")
    x_test, y_test = _arrays(test_ds, spec, f"{dataset} test images")
    classes = getattr(train_ds, "classes", None) or [str(c) for c in range(int(y_train.max()) + 1)]
    logger.info("%s from %s: %d train / %d test images", dataset, base, len(y_train), len(y_test))
    train, test = ArrayImages(x_train, y_train), ArrayImages(x_test, y_test)
    return ImageSource(train, test, train.targets, test.targets, list(classes), name=dataset, flip=spec.flip)
