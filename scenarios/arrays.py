"""In-memory uint8 image arrays as a data set, and the `npz` scenario.

`npz`: a file with `x_train, y_train, x_test, y_test[, classes]`; images uint8 N x H x W or
N x H x W x C (C = 1, 3 or 4), integer labels. Class names come from `classes` when present, else
`str(label)`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import ImageSource
from .stream import register_source

logger = logging.getLogger(__name__)

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


class ArrayImages(Dataset):
    """Items `(image uint8 C x H x W, label)` from a uint8 array N x C x H x W (no copy)."""

    def __init__(self, images: torch.Tensor, targets: Sequence[int]):
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])


def to_nchw(images: np.ndarray | torch.Tensor, what: str = "images") -> torch.Tensor:
    """A uint8 tensor N x C x H x W viewing `images` (N x H x W or N x H x W x C, C in 1, 3, 4)."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 images (0..255), got dtype {x.dtype}")
    if x.ndim == 3:
        return x.unsqueeze(1)
    if x.ndim == 4 and x.shape[-1] in (1, 3, 4):
        return x.permute(0, 3, 1, 2)
    raise ValueError(
        f"{what} must be N x H x W or N x H x W x C with C in 1, 3, 4; got shape {tuple(x.shape)}"
    )


def source_from_arrays(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    classes: Sequence[str] | None,
    name: str,
    flip: bool = True,
) -> ImageSource:
    """An `ImageSource` from uint8 image arrays and integer labels.

    With `classes`, labels must lie in `0..len(classes)-1`; without, the labels present are mapped
    in sorted order to `0..K-1` and named `str(label)`.
    """
    y_train = np.asarray(y_train)
    y_test = np.asarray(y_test)
    for key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"{key} of {name!r} must be a 1-d integer array, got {y.dtype} {y.shape}")
    if classes is not None:
        classes = [str(c) for c in classes]
        for key, y in (("y_train", y_train), ("y_test", y_test)):
            if len(y) and (y.min() < 0 or y.max() >= len(classes)):
                raise ValueError(
                    f"{key} of {name!r} has labels outside 0..{len(classes) - 1} (the {len(classes)} classes)"
                )
    else:
        labels = np.unique(np.concatenate([y_train, y_test]))
        classes = [str(int(c)) for c in labels]
        if not np.array_equal(labels, np.arange(len(labels))):
            y_train = np.searchsorted(labels, y_train)
            y_test = np.searchsorted(labels, y_test)
    train = ArrayImages(to_nchw(x_train, f"x_train of {name!r}"), y_train)
    test = ArrayImages(to_nchw(x_test, f"x_test of {name!r}"), y_test)
    return ImageSource(train, test, train.targets, test.targets, classes, name, flip)


@register_source("npz")
def load_npz(path: str) -> ImageSource:
    """Images from a .npz file with `x_train, y_train, x_test, y_test[, classes]`.

    Args:
        path: the .npz file (set `flip: false` for digits-like data).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"npz file {str(file)!r} does not exist")
    try:
        with np.load(file, allow_pickle=False) as data:
            missing = [k for k in NPZ_KEYS if k not in data.files]
            if missing:
                raise ValueError(
                    f"npz file {str(file)!r} lacks {', '.join(missing)}; it needs "
                    f"{', '.join(NPZ_KEYS)} (and optionally classes); found {', '.join(data.files)}"
                )
            arrays = {k: data[k] for k in NPZ_KEYS}
            classes = _read_classes(data, file)
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read npz file {str(file)!r}: {err}") from err
    logger.info("loaded %s: %d train / %d test images", file, len(arrays["y_train"]), len(arrays["y_test"]))
    return source_from_arrays(**arrays, classes=classes, name=file.stem)


def _read_classes(data: np.lib.npyio.NpzFile, file: Path) -> list[str] | None:
    if "classes" not in data.files:
        return None
    try:
        return [str(c) for c in data["classes"].tolist()]
    except ValueError as err:  # an object array needs pickle, which we do not load
        raise ValueError(
            f"cannot read `classes` of {str(file)!r} (save it as a string array): {err}"
        ) from err
