"""`image_folder`: `root/<class>/*.jpg|jpeg|png`, or `root/train/<class>/...` + `root/test/<class>/...`.

Classes are the folder names sorted by name (then ordered by `class_order_seed`). Without a `test`
folder, a seeded `test_fraction` of each class is held out. Images are opened lazily with PIL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .base import ImageSource
from .stream import register_source

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class ImageFiles(Dataset):
    """Items `(PIL RGB image, label)` read from `files` on access."""

    def __init__(self, files: list[Path], targets: list[int]):
        self.files = files
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        path = self.files[i]
        try:
            with Image.open(path) as img:
                return img.convert("RGB"), int(self.targets[i])
        except (OSError, UnidentifiedImageError) as err:
            raise ValueError(f"cannot read image {str(path)!r}: {err}") from err


def _class_dirs(root: Path) -> list[Path]:
    return sorted(
        (d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _check_image(path: Path) -> None:
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # PIL raises many types for corrupt files
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from err


def _scan(root: Path, what: str) -> dict[str, list[Path]]:
    dirs = _class_dirs(root)
    if not dirs:
        raise ValueError(
            f"no class folders in {what} folder {str(root)!r} (expected {root}/<class>/*.png|jpg)"
        )
    files = {}
    for d in dirs:
        imgs = _images(d)
        if not imgs:
            raise ValueError(f"class folder {str(d)!r} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files[d.name] = imgs
    return files


@register_source("image_folder")
def load_image_folder(
    root: str, test_fraction: float = 0.2, verify: bool = True, seed: int = 0
) -> ImageSource:
    """Images in class folders under `root`.

    Args:
        root: `root/<class>/*` (a seeded held-out `test_fraction` per class is the test split) or
            `root/train/<class>/*` and `root/test/<class>/*`.
        test_fraction: share of each class held out when there is no `test` folder.
        verify: check every image file with PIL up front, so a corrupt file fails now, named.
        seed: seed of the held-out split (the common option).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ValueError(f"image folder root {str(base)!r} does not exist")
    if (base / "train").is_dir() and (base / "test").is_dir():
        train_files = _scan(base / "train", "train")
        test_files = _scan(base / "test", "test")
        classes = sorted(train_files)
        missing = [c for c in classes if c not in test_files]
        if missing:
            raise ValueError(f"class {missing[0]!r} has no test images in {str(base / 'test')!r}")
        extra = sorted(set(test_files) - set(train_files))
        if extra:
            raise ValueError(f"test class {extra[0]!r} in {str(base / 'test')!r} has no train folder")
    else:
        if not 0.0 < float(test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        files = _scan(base, "image")
        classes = sorted(files)
        train_files, test_files = {}, {}
        for label, name in enumerate(classes):
            paths = files[name]
            n_test = int(round(len(paths) * float(test_fraction)))
            if n_test == 0:
                raise ValueError(
                    f"class {name!r} in {str(base)!r} has {len(paths)} image(s): too few for a "
                    f"test_fraction of {test_fraction} to leave any test images"
                )
            if n_test == len(paths):
                raise ValueError(f"class {name!r} in {str(base)!r} has no train images left after the split")
            perm = np.random.default_rng([seed, label]).permutation(len(paths))
            test_files[name] = [paths[i] for i in sorted(perm[:n_test])]
            train_files[name] = [paths[i] for i in sorted(perm[n_test:])]
    splits = []
    for files in (train_files, test_files):
        paths = [p for c in classes for p in files[c]]
        targets = [label for label, c in enumerate(classes) for _ in files[c]]
        if verify:
            for p in paths:
                _check_image(p)
        splits.append(ImageFiles(paths, targets))
    train, test = splits
    logger.info(
        "image folder %s: %d classes, %d train / %d test images", base, len(classes), len(train), len(test)
    )
    return ImageSource(train, test, train.targets, test.targets, classes, name=base.name)
