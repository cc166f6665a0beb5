"""`multi_dataset`: each task is a whole data set (EMTAL's multi-task FGVC; MNIST -> Fashion-MNIST).

```yaml
scenario:
  name: multi_dataset
  mode: til
  datasets:
    - {name: npz, path: ../shared/data/mnist.npz, flip: false, max_per_class: 500}
    - {name: npz, path: ../shared/data/fashion_mnist.npz, max_per_class: 500}
```

An entry takes its source's own options (e.g. `path`) and the per-source options
`class_order_seed`, `max_per_class`, `max_test_per_class`, `validation_per_class`, `flip`;
top-level values of those are defaults for every entry. Stream options (`mode`, `image_size`,
`mean`, `std`, `augment`, `seed`) are top-level only. In CIL the labels of task i start after
those of tasks 0..i-1.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .base import ImageSource, StreamOptions, TaskStream, check_option_names, register_scenario
from .stream import (
    PER_SOURCE_OPTIONS,
    SOURCES,
    TaskSpec,
    build_stream,
    call_loader,
    check_required,
    class_order,
    loader_options,
)


def _load_entry(entry: Any, index: int, options: StreamOptions) -> tuple[ImageSource, StreamOptions]:
    if not isinstance(entry, dict) or "name" not in entry:
        raise ValueError(f"datasets[{index}] must be a mapping with a `name` key, got {entry!r}")
    kw = dict(entry)
    name = kw.pop("name")
    loader = SOURCES.get(name)
    own = loader_options(loader)
    for key in kw:
        if key in StreamOptions.names() and key not in PER_SOURCE_OPTIONS:
            raise ValueError(
                f"datasets[{index}] ({name}): {key!r} applies to the whole stream; set it at the top "
                f"level of the multi_dataset scenario"
            )
    check_option_names(kw, [*own, *PER_SOURCE_OPTIONS], where=f"datasets[{index}] ({name})")
    per_source = {k: kw.pop(k) for k in PER_SOURCE_OPTIONS if k in kw}
    entry_opts = dataclasses.replace(options, **per_source)  # validates the entry's values
    check_required(loader, kw, name)
    return call_loader(loader, kw, entry_opts), entry_opts


def _disambiguate(sources: list[ImageSource]) -> list[ImageSource]:
    """Prefix class names with the source name when two tasks share a class name."""
    counts = Counter(c for s in sources for c in s.classes)
    if all(n == 1 for n in counts.values()):
        return sources
    return [dataclasses.replace(s, classes=[f"{s.name}/{c}" for c in s.classes]) for s in sources]


@register_scenario("multi_dataset")
def multi_dataset(datasets: Sequence[dict[str, Any]], **options: Any) -> TaskStream:
    """One task per data set, each built by a registered source (`digits`, `npz`, `image_folder`, ...).

    Args:
        datasets: entries `{name: <source>, <source options>, <per-source options>}`, in task order.
        **options: common stream options; `n_tasks` / `classes_per_task` do not apply.
    """
    if isinstance(datasets, (str, dict)) or not isinstance(datasets, Sequence) or not datasets:
        raise ValueError(f"datasets must be a non-empty list of {{name: ..., <options>}}, got {datasets!r}")
    opts = StreamOptions.from_options(options, extra_valid=("datasets",))
    if opts.classes_per_task is not None or opts.n_tasks not in (None, len(datasets)):
        raise ValueError(
            "multi_dataset makes one task per entry of `datasets`; drop n_tasks / classes_per_task "
            f"(got n_tasks={opts.n_tasks}, classes_per_task={opts.classes_per_task})"
        )
    loaded = [_load_entry(entry, i, opts) for i, entry in enumerate(datasets)]
    sources = _disambiguate([src for src, _ in loaded])
    tasks = []
    for src, (orig, entry_opts) in zip(sources, loaded):
        flip = orig.flip if entry_opts.flip is None else entry_opts.flip
        order = class_order(src.num_classes, entry_opts.class_order_seed)
        tasks.append(
            TaskSpec(
                src,
                order,
                flip,
                entry_opts.max_per_class,
                entry_opts.max_test_per_class,
                entry_opts.validation_per_class,
            )
        )
    return build_stream(tasks, opts, "+".join(s.name for s in sources))
