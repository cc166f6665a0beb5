"""Task streams for cmtl: `create_scenario(name, **options) -> TaskStream`.

Registered scenarios: `digits` (embedded default, no download), `npz`, `image_folder`,
`torchvision`, `multi_dataset`. See `cmtl.scenarios.base` for the label convention.
"""

from . import arrays, digits, folder, multi, tv  # noqa: F401  (register the builders)
from .base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageSource,
    StreamOptions,
    TaskStream,
    create_scenario,
    list_scenarios,
    register_scenario,
)
from .stream import register_source
from .transforms import make_transforms

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageSource",
    "StreamOptions",
    "TaskStream",
    "create_scenario",
    "list_scenarios",
    "make_transforms",
    "register_scenario",
    "register_source",
]
