"""`digits`: the embedded default stream, scikit-learn's bundled 8x8 digits (1,797 images, no download).

Split MNIST in miniature: 10 classes "0".."9", by default 5 tasks of 2 classes, a seeded stratified
train/test split. Flips are off by default (a mirrored digit is another symbol).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits as sklearn_digits
from sklearn.model_selection import train_test_split

from .arrays import source_from_arrays
from .base import ImageSource
from .stream import register_source


def digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as uint8 N x image_size x image_size (bilinear upsampling) and their labels."""
    data = sklearn_digits()
    x = torch.from_numpy(data.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)
    if image_size != x.shape[-1]:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).squeeze(1).numpy()
    return x, data.target.astype(np.int64)


@register_source("digits")
def load_digits(test_fraction: float = 0.3, image_size: int = 32, seed: int = 0) -> ImageSource:
    """scikit-learn's 8x8 digits, upsampled to `image_size`, split train/test by class.

    Args:
        test_fraction: share of each class held out for testing (seeded by `seed`).
        image_size: side the images are upsampled to (the common option).
        seed: seed of the split (the common option).
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    x, y = digits_arrays(image_size)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=float(test_fraction), stratify=y, random_state=seed
    )
    classes = [str(c) for c in range(10)]
    return source_from_arrays(x_train, y_train, x_test, y_test, classes, name="digits", flip=False)
