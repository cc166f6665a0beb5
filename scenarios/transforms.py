"""Train (augmenting) and eval (resize + normalise) image transforms.

Both accept a uint8 tensor C x H x W (C = 1, 3 or 4) or a PIL image and return a plain float tensor
3 x image_size x image_size normalised with `mean` / `std`; grayscale is repeated to RGB.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchvision.transforms import v2


class ToRGB:
    """Make an image tensor C x H x W three-channel: repeat grayscale, drop an alpha channel."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels = img.shape[-3]
        if channels == 3:
            return img
        if channels == 1:
            return img.expand(*img.shape[:-3], 3, *img.shape[-2:])
        if channels == 4:
            return img[..., :3, :, :]
        raise ValueError(f"cannot make an RGB image from {channels} channels (shape {tuple(img.shape)})")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def make_transforms(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool = True,
    flip: bool = True,
) -> tuple[Callable, Callable]:
    """The `(train, eval)` transforms of one data set.

    Args:
        image_size: side of the square output.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        augment: random resized crop (scale 0.8-1) in the train transform; else train == eval.
        flip: random horizontal flip in the train transform (only when augmenting).
    """
    head = [v2.ToImage(), ToRGB()]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), v2.ToPureTensor()]
    eval_tf = v2.Compose([*head, v2.Resize((image_size, image_size), antialias=True), *tail])
    if not augment:
        return eval_tf, eval_tf
    aug = [v2.RandomResizedCrop(image_size, scale=(0.8, 1.0), antialias=True)]
    if flip:
        aug.append(v2.RandomHorizontalFlip())
    train_tf = v2.Compose([*head, *aug, *tail])
    return train_tf, eval_tf
