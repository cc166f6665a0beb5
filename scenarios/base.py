"""Task streams: the `TaskStream` result, the common stream options and the scenario registry.

Every scenario builder returns a `TaskStream`: an Avalanche benchmark plus what the model needs to
know about it (mode, class names per task, input size and normalisation).

Label convention (the model depends on it):

- ``til``: experience ``i`` has task label ``i`` and LOCAL targets ``0..n_i-1`` (``task_classes[i]``
  order).
- ``cil``: every experience has task label 0 and GLOBAL targets in order of arrival (experience 0 has
  ``0..n_0-1``, experience 1 has ``n_0..n_0+n_1-1``, ...), so a growing head works.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cmtl.registry import Registry, closest

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODES = ("til", "cil")

SCENARIOS = Registry("scenario")


@dataclass
class TaskStream:
    """A stream of tasks ready for an Avalanche strategy.

    Attributes:
        benchmark: Avalanche 0.6 `CLScenario` with `train_stream` and `test_stream`; experiences carry
            `task_label` and `classes_in_this_experience`.
        mode: "til" (task label i, local targets) or "cil" (task label 0, global targets).
        task_classes: class names of each experience, in label order.
        image_size: side of the square float images the datasets yield.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        name: a short description of the stream (e.g. "digits").
        evaluation: what `test_stream` holds: "test" (the test split) or "validation" (training
            images held out by `validation_per_class`).
    """

    benchmark: Any
    mode: str
    task_classes: list[list[str]]
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    evaluation: str = "test"

    @property
    def num_tasks(self) -> int:
        """Number of experiences."""
        return len(self.task_classes)

    @property
    def classes_per_task(self) -> list[int]:
        """Number of classes of each experience."""
        return [len(c) for c in self.task_classes]

    @property
    def num_classes(self) -> int:
        """Total number of classes over the stream."""
        return sum(self.classes_per_task)


@dataclass
class StreamOptions:
    """Options common to every builder (validated on construction).

    Attributes:
        mode: "til" or "cil".
        n_tasks: number of experiences (default: 5 unless `classes_per_task` decides it).
        classes_per_task: classes of each experience, an int or one int per experience.
        class_order_seed: None keeps the natural class order; an int permutes it with that seed.
        max_per_class: keep at most this many train images per class (seeded subsample).
        max_test_per_class: the same for test images.
        validation_per_class: hold out this many training images per class (seeded, before
            `max_per_class` subsamples the rest) and evaluate on them instead of the test split:
            for choosing settings without looking at test data. None: evaluate on the test split.
        image_size: side of the square output images (None: 32).
        mean: normalisation mean, e.g. from the backbone's timm pretrained config (None: ImageNet's).
        std: normalisation std (None: ImageNet's).
        augment: random resized crop (scale 0.8-1) (+ flip) in the train transform group.
        flip: horizontal flip when augmenting; None uses the data set's default (off for digits).
        seed: seed of subsampling and of random train/test splits.
    """

    mode: str = "til"
    n_tasks: int | None = None
    classes_per_task: int | list[int] | None = None
    class_order_seed: int | None = None
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    validation_per_class: int | None = None
    image_size: int = 32
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    augment: bool = True
    flip: bool | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        # None (e.g. `image_size: null` in YAML) means the default
        for key, default in (("image_size", 32), ("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
            if getattr(self, key) is None:
                setattr(self, key, default)
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not valid; valid: {', '.join(MODES)}")
        _check_int("n_tasks", self.n_tasks, allow_none=True)
        cpt = self.classes_per_task
        if isinstance(cpt, Sequence) and not isinstance(cpt, str):
            if len(cpt) == 0:
                raise ValueError("classes_per_task is an empty list; give an int or one int per task")
            for c in cpt:
                _check_int("classes_per_task", c)
            self.classes_per_task = [int(c) for c in cpt]
        else:
            _check_int("classes_per_task", cpt, allow_none=True)
        if self.class_order_seed is not None and not _is_int(self.class_order_seed):
            raise ValueError(f"class_order_seed must be None or an int, got {self.class_order_seed!r}")
        _check_int("max_per_class", self.max_per_class, allow_none=True)
        _check_int("max_test_per_class", self.max_test_per_class, allow_none=True)
        _check_int("validation_per_class", self.validation_per_class, allow_none=True)
        _check_int("image_size", self.image_size)
        self.mean = _triple("mean", self.mean)
        self.std = _triple("std", self.std)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        for key in ("augment",):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.flip is not None and not isinstance(self.flip, bool):
            raise ValueError(f"flip must be true, false or null, got {self.flip!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    @classmethod
    def names(cls) -> list[str]:
        """Names of the common options."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_options(cls, options: dict[str, Any], extra_valid: Sequence[str] = ()) -> StreamOptions:
        """Build from a dict, rejecting unknown keys (named together with the valid ones)."""
        check_option_names(options, [*extra_valid, *cls.names()])
        return cls(**options)


def check_option_names(options: dict[str, Any], valid: Sequence[str], where: str = "scenario") -> None:
    """Raise ValueError for the first key of `options` that is not in `valid`."""
    for key in options:
        if key not in valid:
            near = closest(str(key), list(valid))
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ValueError(f"unknown {where} option {key!r}{hint}; valid: {', '.join(sorted(valid))}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < 1:
        none = "None or " if allow_none else ""
        raise ValueError(f"{name} must be {none}a positive int, got {value!r}")


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {value!r}")
    return out  # type: ignore[return-value]


@dataclass
class ImageSource:
    """A labelled image data set with a train and a test split, before it is split into tasks.

    Attributes:
        train: torch Dataset whose items are `(image, label)`; image a uint8 tensor C x H x W
            (C = 1 or 3) or a PIL image.
        test: the same for the test split.
        train_targets: label of every train item (ints in 0..len(classes)-1).
        test_targets: label of every test item.
        classes: class names, indexed by label.
        name: short name of the data set (used in stream names and to disambiguate class names).
        flip: whether horizontal flips suit this data set (the default of the `flip` option).
    """

    train: Any
    test: Any
    train_targets: Any
    test_targets: Any
    classes: list[str]
    name: str
    flip: bool = True

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def register_scenario(
    name: str | None = None,
) -> Callable[[Callable[..., TaskStream]], Callable[..., TaskStream]]:
    """Decorator registering a builder `(**options) -> TaskStream` under `name`."""
    return SCENARIOS.register(name)


def create_scenario(name: str, **options: Any) -> TaskStream:
    """Build the registered scenario `name` with `options`.

    Raises:
        ValueError: unknown scenario name (the message lists the valid ones) or bad option.
    """
    return SCENARIOS.create(name, **options)


def list_scenarios() -> list[str]:
    """Names of the registered scenarios, sorted."""
    return SCENARIOS.names()
