"""Turn image sources into task streams: class order, task split, subsampling, Avalanche assembly.

`register_source` registers a loader `(**source_options) -> ImageSource` twice: as a scenario
builder (the source split into tasks by the common options) and as a source that `multi_dataset`
can use as one whole task.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from cmtl.registry import Registry

from .base import SCENARIOS, ImageSource, StreamOptions, TaskStream
from .transforms import make_transforms

logger = logging.getLogger(__name__)

SOURCES = Registry("source")
DEFAULT_N_TASKS = 5
# Options that select data inside one source (valid in a `multi_dataset` entry); the others shape
# the whole stream.
PER_SOURCE_OPTIONS = (
    "class_order_seed",
    "max_per_class",
    "max_test_per_class",
    "validation_per_class",
    "flip",
)


@dataclass
class TaskSpec:
    """One experience: which classes of which source, in label order."""

    source: ImageSource
    class_ids: list[int]
    flip: bool
    max_per_class: int | None = None
    max_test_per_class: int | None = None
    validation_per_class: int | None = None


class _Relabeled(Dataset):
    """Items `indices` of `base` with new targets (the image transform is Avalanche's job)."""

    def __init__(self, base: Dataset, indices: np.ndarray, targets: list[int]):
        self.base = base
        self.indices = indices
        self.targets = targets

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.base[int(self.indices[i])][0], self.targets[i]


def class_order(num_classes: int, class_order_seed: int | None) -> list[int]:
    """Natural order `0..C-1`, or a permutation seeded by `class_order_seed`."""
    if class_order_seed is None:
        return list(range(num_classes))
    return [int(c) for c in np.random.default_rng(class_order_seed).permutation(num_classes)]


def task_sizes(num_classes: int, n_tasks: int | None, classes_per_task: int | list[int] | None) -> list[int]:
    """Number of classes of each task.

    A list `classes_per_task` fixes everything; an int with `n_tasks` uses `n_tasks * cpt` classes;
    an int alone uses `C // cpt` tasks; `n_tasks` alone (default 5) must divide `C`. Unused classes
    are dropped with a log message.
    """
    if isinstance(classes_per_task, list):
        if n_tasks is not None and n_tasks != len(classes_per_task):
            raise ValueError(
                f"n_tasks={n_tasks} does not match classes_per_task={classes_per_task} "
                f"({len(classes_per_task)} tasks); give one of them"
            )
        sizes = list(classes_per_task)
    elif classes_per_task is not None:
        n = n_tasks if n_tasks is not None else num_classes // classes_per_task
        sizes = [classes_per_task] * n
    else:
        n = n_tasks if n_tasks is not None else DEFAULT_N_TASKS
        if num_classes % n:
            raise ValueError(
                f"{num_classes} classes cannot be split evenly into n_tasks={n}; "
                f"set n_tasks to a divisor of {num_classes} or classes_per_task (an int or a list)"
            )
        sizes = [num_classes // n] * n
    if not sizes or sum(sizes) > num_classes:
        raise ValueError(
            f"classes_per_task={classes_per_task}, n_tasks={n_tasks} need {sum(sizes)} classes "
            f"but the data set has {num_classes}"
        )
    if sum(sizes) < num_classes:
        logger.info("using %d of %d classes (%s)", sum(sizes), num_classes, sizes)
    return sizes


def subsample_per_class(
    targets: np.ndarray, class_id: int, limit: int | None, seed: int, salt: int
) -> np.ndarray:
    """Indices of class `class_id` in `targets`, at most `limit` of them (seeded, sorted)."""
    return _subsample(np.flatnonzero(targets == class_id), limit, [seed, class_id, salt])


def _subsample(idx: np.ndarray, limit: int | None, key: list[int]) -> np.ndarray:
    if limit is not None and len(idx) > limit:
        idx = np.sort(np.random.default_rng(key).choice(idx, size=limit, replace=False))
    return idx


def train_validation_indices(
    targets: np.ndarray, class_id: int, max_train: int | None, n_validation: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of one class, both from the training split and disjoint.

    `n_validation` images of the class are held out first (seeded), then the training images are
    subsampled from the rest to `max_train`. With `n_validation` None nothing is held out and the
    training indices are exactly `subsample_per_class(..., salt=0)`, so streams without a
    validation split do not change.
    """
    if n_validation is None:
        return subsample_per_class(targets, class_id, max_train, seed, salt=0), np.zeros(0, dtype=np.int64)
    idx = np.flatnonzero(targets == class_id)
    if len(idx) <= n_validation:
        raise ValueError(
            f"validation_per_class={n_validation} leaves no training images of class {class_id} "
            f"({len(idx)} in the training split); valid: an int below {len(idx)} or null"
        )
    held = _subsample(idx, n_validation, [seed, class_id, 2])
    return _subsample(np.setdiff1d(idx, held), max_train, [seed, class_id, 0]), held


def _experience_dataset(
    source: ImageSource,
    split: str,
    class_ids: list[int],
    offset: int,
    limit: int | None,
    task_label: int,
    transforms: tuple[Callable, Callable],
    seed: int,
    validation: int | None = None,
):
    """One experience's data set. `split` "train" or "test"; "validation" takes `validation` held-out
    training images per class (and "train" then leaves them out)."""
    from_train = split in ("train", "validation")
    targets_all = np.asarray(source.train_targets if from_train else source.test_targets)
    indices, targets = [], []
    for local, cid in enumerate(class_ids):
        if from_train:
            train_idx, held = train_validation_indices(targets_all, cid, limit, validation, seed)
            idx = train_idx if split == "train" else held
        else:
            idx = subsample_per_class(targets_all, cid, limit, seed, salt=1)
        if len(idx) == 0:
            raise ValueError(f"class {source.classes[cid]!r} of {source.name!r} has no {split} images")
        indices.append(idx)
        targets.extend([offset + local] * len(idx))
    base = _Relabeled(source.train if from_train else source.test, np.concatenate(indices), targets)
    from avalanche.benchmarks.utils import _make_taskaware_classification_dataset

    train_tf, eval_tf = transforms
    if split == "train":
        groups, initial = {"train": train_tf, "eval": eval_tf}, "train"
    else:  # never augment test data, whichever group a strategy selects
        groups, initial = {"train": eval_tf, "eval": eval_tf}, "eval"
    return _make_taskaware_classification_dataset(
        base,
        targets=targets,
        task_labels=task_label,
        transform_groups=groups,
        initial_transform_group=initial,
    )


def build_stream(tasks: Sequence[TaskSpec], options: StreamOptions, name: str) -> TaskStream:
    """Assemble experiences `tasks` into a `TaskStream` following the TIL/CIL label convention."""
    # Avalanche takes seconds to import: load it only when a stream is built.
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.task_aware import with_task_labels

    held_out = [spec.validation_per_class is not None for spec in tasks]
    if any(held_out) and not all(held_out):
        raise ValueError(
            "validation_per_class is set for some tasks only; set it for every task or for none "
            "(the evaluation stream is either validation or test data)"
        )
    evaluation = "validation" if all(held_out) else "test"
    train_sets, test_sets, task_classes = [], [], []
    offset = 0
    for i, spec in enumerate(tasks):
        tfs = make_transforms(options.image_size, options.mean, options.std, options.augment, spec.flip)
        task_label = i if options.mode == "til" else 0
        first = 0 if options.mode == "til" else offset
        common = dict(class_ids=spec.class_ids, offset=first, task_label=task_label, transforms=tfs)
        held = spec.validation_per_class
        train_sets.append(
            _experience_dataset(
                spec.source, "train", limit=spec.max_per_class, seed=options.seed, validation=held, **common
            )
        )
        # tuning: the evaluation stream is held-out training data, and the test split is not read
        split, limit = (
            ("test", spec.max_test_per_class) if held is None else ("validation", spec.max_per_class)
        )
        test_sets.append(
            _experience_dataset(spec.source, split, limit=limit, seed=options.seed, validation=held, **common)
        )
        task_classes.append([spec.source.classes[c] for c in spec.class_ids])
        offset += len(spec.class_ids)
    benchmark = with_task_labels(benchmark_from_datasets(train=train_sets, test=test_sets))
    add_classes_timeline(benchmark)
    logger.info(
        "stream %s (%s): %d tasks, classes per task %s, %d train / %d %s images",
        name,
        options.mode,
        len(tasks),
        [len(c) for c in task_classes],
        sum(len(d) for d in train_sets),
        sum(len(d) for d in test_sets),
        evaluation,
    )
    return TaskStream(
        benchmark=benchmark,
        mode=options.mode,
        task_classes=task_classes,
        image_size=options.image_size,
        mean=options.mean,
        std=options.std,
        name=name,
        evaluation=evaluation,
    )


def add_classes_timeline(benchmark: Any) -> None:
    """Set `classes_in_this_experience`, `previous_classes`, `classes_seen_so_far` and
    `future_classes` on every experience, as sorted lists.

    Avalanche's `with_classes_timeline` sets them as sets, which its own `MultiHeadClassifier`
    cannot index with (IndexError), so we do it ourselves.
    """
    for stream in benchmark.streams.values():
        per_exp = [sorted(int(c) for c in exp.dataset.targets.uniques) for exp in stream]
        every = set().union(*per_exp)
        seen: set[int] = set()
        for exp, classes in zip(stream, per_exp):
            exp.classes_in_this_experience = classes
            exp.previous_classes = sorted(seen)
            seen |= set(classes)
            exp.classes_seen_so_far = sorted(seen)
            exp.future_classes = sorted(every - seen)


def split_source(source: ImageSource, options: StreamOptions) -> TaskStream:
    """Split one source into tasks by class (`n_tasks` / `classes_per_task` / `class_order_seed`)."""
    order = class_order(source.num_classes, options.class_order_seed)
    sizes = task_sizes(source.num_classes, options.n_tasks, options.classes_per_task)
    flip = source.flip if options.flip is None else options.flip
    tasks, start = [], 0
    for size in sizes:
        ids = order[start : start + size]
        tasks.append(
            TaskSpec(
                source,
                ids,
                flip,
                options.max_per_class,
                options.max_test_per_class,
                options.validation_per_class,
            )
        )
        start += size
    return build_stream(tasks, options, source.name)


def loader_options(loader: Callable[..., ImageSource]) -> list[str]:
    """A loader's own keyword options (parameters named like common options, e.g. `seed` or
    `image_size`, are filled from the common options instead)."""
    common = set(StreamOptions.names())
    return [p for p in inspect.signature(loader).parameters if p not in common]


def call_loader(
    loader: Callable[..., ImageSource], source_kw: dict[str, Any], options: StreamOptions
) -> ImageSource:
    """Call `loader` with its own options plus the common options it declares."""
    params = inspect.signature(loader).parameters
    shared = {k: getattr(options, k) for k in StreamOptions.names() if k in params}
    return loader(**source_kw, **shared)


def check_required(loader: Callable[..., ImageSource], source_kw: dict[str, Any], name: str) -> None:
    """Raise ValueError naming a required loader option missing from `source_kw`."""
    for pname, param in inspect.signature(loader).parameters.items():
        own = pname not in StreamOptions.names()
        if param.default is inspect.Parameter.empty and own and pname not in source_kw:
            raise ValueError(f"{name!r} needs the option {pname!r}")


def split_options(
    loader: Callable[..., ImageSource], options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split `options` into the loader's own and the common stream options."""
    own = set(loader_options(loader))
    return {k: v for k, v in options.items() if k in own}, {k: v for k, v in options.items() if k not in own}


def register_source(name: str) -> Callable[[Callable[..., ImageSource]], Callable[..., ImageSource]]:
    """Register a source loader as scenario `name` (split into tasks) and as a `multi_dataset` source."""

    def deco(loader: Callable[..., ImageSource]) -> Callable[..., ImageSource]:
        SOURCES.register(name)(loader)

        def build(**options: Any) -> TaskStream:
            source_kw, common = split_options(loader, options)
            opts = StreamOptions.from_options(common, extra_valid=loader_options(loader))
            check_required(loader, source_kw, name)
            return split_source(call_loader(loader, source_kw, opts), opts)

        build.__name__ = build.__qualname__ = name
        build.__doc__ = loader.__doc__
        SCENARIOS.register(name)(build)
        return loader

    return deco
