"""Random augmentation of image batches that are already tensors (replayed buffer samples).

The QR buffer keeps its images as normalised tensors, taken from the un-augmented candidate pool.
Replayed as they are, the same few hundred images come back unchanged for every step of every
later task, while the new task's images (and Avalanche's replay memory, which goes through the data
set's transforms) are re-augmented each time. `augment_batch` gives buffer batches the same
augmentation as the dev scenarios' train transform: a random resized crop of 80-100% of the area
with aspect ratio 3/4-4/3, resized back to the full size, and optionally a horizontal flip. Each
sample gets its own crop, drawn from the caller's generator so runs and resumes repeat exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTS = ("none", "crop", "crop_flip")
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def check_augment(name: str) -> str:
    if name not in AUGMENTS:
        raise ValueError(f"augmentation {name!r} is unknown; valid: {', '.join(AUGMENTS)}")
    return name


def random_resized_crop(
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = False,
) -> torch.Tensor:
    """A random crop per sample of `x` (N x C x H x W) resized back to H x W (bilinear).

    Each crop covers a fraction of the area drawn from `scale` with a width / height ratio drawn
    log-uniformly from `ratio`, clipped to the image, at a uniform position inside it; with `flip`
    half the samples (at random) are mirrored left-right as well. The random numbers come from
    `generator` (a CPU generator; None: torch's global one).
    """
    if x.dim() != 4:
        raise ValueError(f"expected a batch N x C x H x W, got shape {tuple(x.shape)}")
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    # sides as fractions of the image's; the grid spans [-1, 1], so a side s leaves 1 - s of slack
    width = (area * aspect).sqrt().clamp(max=1.0)
    height = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    theta = theta.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def augment_batch(x: torch.Tensor, name: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """`x` augmented as `name` says: "none" (unchanged), "crop" or "crop_flip" (see above)."""
    check_augment(name)
    if name == "none" or x.shape[0] == 0:
        return x
    return random_resized_crop(x, generator, flip=name == "crop_flip")
