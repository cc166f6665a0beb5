"""Figures of an accuracy matrix (see `cmtl.metrics` for the convention), written as PNG files.

matplotlib is imported inside the functions, so `import cmtl.plots` costs nothing. Figures are built
with the object-oriented API on an Agg canvas rather than through `pyplot`: no global figure state, no
interactive backend is ever selected, and there is nothing left open after saving. Files are written
atomically (temporary file in the same directory, then `os.replace`), so a reader never sees a
half-written PNG.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cmtl.metrics import row_labels, validate_matrix

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_accuracy_matrix", "plot_accuracy_per_task"]

_MAX_ANNOTATED_TASKS = 25  # beyond this the numbers in the cells are too small to read
_MAX_LEGEND_TASKS = 10


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_atomic(fig: Figure, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory so os.replace is an atomic rename; ".png" suffix so the format is unambiguous.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_accuracy_matrix(
    matrix: Sequence[Sequence[float]],
    path: str | os.PathLike[str],
    title: str | None = None,
    task_names: Sequence[str] | None = None,
) -> Path:
    """Heatmap of the matrix (rows: after task i, columns: task j), annotated in percent.

    Cells above the diagonal are left blank. A single-row joint matrix is drawn as one row.

    Args:
        matrix: the accuracy matrix (validated by `cmtl.metrics.validate_matrix`).
        path: PNG file to write; parent directories are created.
        title: figure title.
        task_names: one column label per task (defaults to the task indices).

    Returns:
        The written path.
    """
    import numpy as np

    rows = validate_matrix(matrix)
    num_rows, num_tasks = len(rows), len(rows[-1])
    if task_names is not None and len(task_names) != num_tasks:
        raise ValueError(f"task_names has {len(task_names)} names, expected one per task ({num_tasks})")
    names = [str(n) for n in task_names] if task_names is not None else [str(j) for j in range(num_tasks)]

    grid = np.full((num_rows, num_tasks), np.nan)
    for i, row in enumerate(rows):
        grid[i, : len(row)] = row
    values = np.ma.masked_invalid(grid)

    fig = _new_figure(max(3.5, 0.55 * num_tasks + 2.0), max(2.2, 0.45 * num_rows + 1.5))
    ax = fig.add_subplot()
    image = ax.imshow(100 * values, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    if task_names is None:
        ax.set_xticks(range(num_tasks), names)
    else:
        ax.set_xticks(range(num_tasks), names, rotation=45, ha="right")
    ax.set_yticks(range(num_rows), row_labels(rows))
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("trained up to")
    ax.tick_params(length=0)
    if num_tasks <= _MAX_ANNOTATED_TASKS:
        fontsize = 9 if num_tasks <= 10 else 6
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                # Dark cells of viridis need light text and vice versa.
                color = "black" if v > 0.6 else "white"
                ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", color=color, fontsize=fontsize)
    if title:
        ax.set_title(title)
    return _save_atomic(fig, path)


def plot_accuracy_per_task(
    matrix: Sequence[Sequence[float]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Accuracy of each task over the training steps after it was learnt, plus the running average.

    Task j is a thin line over steps i >= j; the mean of row i (average accuracy on the tasks seen
    so far) is the thick black line. A single-row joint matrix gives one point per task.

    Args:
        matrix: the accuracy matrix (validated by `cmtl.metrics.validate_matrix`).
        path: PNG file to write; parent directories are created.
        title: figure title.

    Returns:
        The written path.
    """
    import matplotlib as mpl

    rows = validate_matrix(matrix)
    num_rows, num_tasks = len(rows), len(rows[-1])
    joint = num_rows == 1 and num_tasks > 1

    fig = _new_figure(max(4.5, 0.4 * num_rows + 3.5), 3.5)
    ax = fig.add_subplot()
    cmap = mpl.colormaps["tab10" if num_tasks <= 10 else "viridis"]
    for j in range(num_tasks):
        steps = [0] if joint else list(range(j, num_rows))
        acc = [100 * rows[i][j] for i in steps]
        color = cmap(j if num_tasks <= 10 else j / max(num_tasks - 1, 1))
        label = f"task {j}" if num_tasks <= _MAX_LEGEND_TASKS else None
        ax.plot(steps, acc, marker="o", markersize=3, linewidth=1, color=color, label=label)
    average = [100 * sum(row) / len(row) for row in rows]
    ax.plot(range(num_rows), average, marker="o", linewidth=3, color="black", label="average", zorder=1.5)

    ax.set_xticks(range(num_rows), row_labels(rows) if joint else [str(i) for i in range(num_rows)])
    ax.set_xlim(-0.5, num_rows - 0.5)
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training step" if joint else "after training task")
    ax.set_ylabel("accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    if title:
        ax.set_title(title)
    return _save_atomic(fig, path)
