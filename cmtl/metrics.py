"""Continual-learning metrics on an accuracy matrix, and the text tables that report them.

Convention: `R[i][j]` is the accuracy (a fraction in [0, 1]) on task j after training task i, for
j <= i, so the matrix is a lower-triangular list of rows (row i has i + 1 entries). Joint training
(all tasks at once) gives a single row with one entry per task.

    >>> s = summarize([[0.9], [0.8, 0.95], [0.7, 0.9, 0.96]])
    >>> round(s["forgetting"], 3), round(s["bwt"], 3)
    (0.125, -0.125)

Metrics: final average accuracy; average incremental accuracy ("A-bar" of iCaRL / DER, the mean of
the row means); forgetting (Chaudhry et al., 2018, arXiv 1801.10112); backward transfer (Lopez-Paz &
Ranzato, 2017, arXiv 1706.08840). Pure Python, so it is cheap to import from the CLI.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_PERCENT_KEYS",
    "compare_table",
    "format_matrix",
    "mean_std",
    "paired_differences",
    "row_labels",
    "summarize",
    "validate_matrix",
]

DEFAULT_PERCENT_KEYS = frozenset(
    {"final_average_accuracy", "average_incremental_accuracy", "forgetting", "bwt"}
)
MISSING = "–"


def validate_matrix(matrix: Sequence[Sequence[float]]) -> list[list[float]]:
    """Checks the shape and values of an accuracy matrix and returns it as lists of floats.

    Raises:
        ValueError: the matrix is empty, a row has the wrong length (row i must have i + 1 entries;
            a single-row joint matrix may have any length >= 1), or a value is not a finite number
            in [0, 1].
    """
    if isinstance(matrix, (str, bytes)) or not isinstance(matrix, Iterable):
        raise ValueError(f"accuracy matrix must be a list of rows, got {type(matrix).__name__}")
    rows = list(matrix)
    if not rows:
        raise ValueError("accuracy matrix is empty: expected at least one row")
    out: list[list[float]] = []
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, Iterable):
            raise ValueError(f"row {i} of the accuracy matrix must be a list of numbers, got {row!r}")
        row = list(row)
        if len(rows) == 1:
            if not row:
                raise ValueError("accuracy matrix has a single empty row: expected at least one value")
        elif len(row) != i + 1:
            raise ValueError(
                f"accuracy matrix must be lower-triangular: row {i} (after task {i}) has {len(row)} "
                f"entries, expected {i + 1} (only a single-row joint matrix may have any length)"
            )
        values = []
        for j, v in enumerate(row):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise ValueError(f"accuracy R[{i}][{j}] must be a number in [0, 1], got {v!r}")
            v = float(v)
            if not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"accuracy R[{i}][{j}] = {v!r} is not a finite fraction in [0, 1]")
            values.append(v)
        out.append(values)
    return out


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def summarize(matrix: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Standard continual-learning metrics of an accuracy matrix (see the module docstring).

    Returns:
        A dict with `final_average_accuracy` (mean of the last row), `average_incremental_accuracy`
        (mean of the row means), `forgetting` (mean over tasks j < T-1 of
        max_{j <= i < T-1} R[i][j] - R[T-1][j]), `bwt` (mean over j < T-1 of R[T-1][j] - R[j][j]),
        `per_task_forgetting` (the T-1 values averaged by `forgetting`) and `num_tasks`.
        `forgetting` and `bwt` are None (and `per_task_forgetting` is empty) with fewer than two
        rows, since there is no earlier state to compare with.
    """
    rows = validate_matrix(matrix)
    last = rows[-1]
    num_tasks = len(last)
    per_task: list[float] = []
    forgetting = bwt = None
    if len(rows) >= 2:
        T = len(rows)
        per_task = [max(rows[i][j] for i in range(j, T - 1)) - last[j] for j in range(T - 1)]
        forgetting = _mean(per_task)
        bwt = _mean([last[j] - rows[j][j] for j in range(T - 1)])
    return {
        "final_average_accuracy": _mean(last),
        "average_incremental_accuracy": _mean([_mean(row) for row in rows]),
        "forgetting": forgetting,
        "bwt": bwt,
        "per_task_forgetting": per_task,
        "num_tasks": num_tasks,
    }


def row_labels(matrix: Sequence[Sequence[float]]) -> list[str]:
    """Row names for tables and plots: "after i", or "joint" for a single row covering several tasks."""
    if len(matrix) == 1 and len(matrix[0]) > 1:
        return ["joint"]
    return [f"after {i}" for i in range(len(matrix))]


def format_matrix(matrix: Sequence[Sequence[float]], percent: bool = True) -> str:
    """A text table of the matrix: one line per row, blanks above the diagonal.

    Args:
        matrix: the accuracy matrix (validated).
        percent: print values as percentages with one decimal (`98.2`); otherwise as fractions
            with three decimals (`0.982`).
    """
    rows = validate_matrix(matrix)
    labels = row_labels(rows)
    num_tasks = len(rows[-1])
    width = 5  # "100.0" and "1.000"
    label_width = max(len("task"), *(len(s) for s in labels))

    def cell(v: float) -> str:
        return f"{100 * v:{width}.1f}" if percent else f"{v:{width}.3f}"

    lines = ["task".ljust(label_width) + "".join(f"  {j:>{width}}" for j in range(num_tasks))]
    for label, row in zip(labels, rows):
        cells = [cell(row[j]) if j < len(row) else " " * width for j in range(num_tasks)]
        lines.append((label.ljust(label_width) + "".join(f"  {c}" for c in cells)).rstrip())
    return "\n".join(lines)


def mean_std(values: Sequence[float | None]) -> tuple[float, float] | None:
    """Mean and population standard deviation of the values that are not None (None if there are none)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    mean = _mean(present)
    return mean, math.sqrt(_mean([(v - mean) ** 2 for v in present]))


def paired_differences(reference: Mapping[int, float], other: Mapping[int, float]) -> dict[str, Any] | None:
    """`reference - other` seed by seed, over the seeds both have (None if fewer than two).

    Runs of the same seed share data, subsample and class order, so the per-seed difference removes
    what the seed does to every strategy alike; a mean over seeds alone can hide that a lead comes
    from one or two seeds. The standard error is the sample standard deviation of the differences
    over sqrt(n).

    Returns:
        `{"seeds", "differences", "mean", "standard_error", "ahead"}`, where `ahead` counts the seeds
        on which the reference is strictly better.
    """
    seeds = sorted(set(reference) & set(other))
    if len(seeds) < 2:
        return None
    diffs = [float(reference[s]) - float(other[s]) for s in seeds]
    mean = _mean(diffs)
    var = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return {
        "seeds": seeds,
        "differences": diffs,
        "mean": mean,
        "standard_error": math.sqrt(var / len(diffs)),
        "ahead": sum(d > 0 for d in diffs),
    }


def _format_cell(key: str, value: Any, percent_keys: frozenset[str] | set[str], show_std: bool) -> str:
    if value is None:
        return MISSING
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise ValueError(f"column {key!r}: expected a number, None or a (mean, std) tuple, got {value!r}")
        mean, std = value
    else:
        mean, std = value, None
    if mean is None:
        return MISSING
    if isinstance(mean, bool) or not isinstance(mean, numbers.Real):
        return str(mean)
    if isinstance(mean, numbers.Integral) and std is None and key not in percent_keys:
        return str(mean)  # counts (tasks, seeds, epochs) read better without ".0"
    scale = 100.0 if key in percent_keys else 1.0
    text = f"{scale * float(mean):.1f}"
    if std is not None and show_std:
        text += f" ± {scale * float(std):.1f}"
    return text


def compare_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[tuple[str, str]],
    percent_keys: Iterable[str] = DEFAULT_PERCENT_KEYS,
    seeds_key: str = "num_seeds",
) -> tuple[str, str]:
    """Formats one line per run (e.g. per strategy) as a terminal table and a GitHub markdown table.

    Each cell value is a string (printed as is), a number, None (printed as "–") or a `(mean, std)`
    tuple such as `mean_std` returns. Values under `percent_keys` are fractions printed as
    percentages with one decimal (no "%" sign: say so in the header); other numbers get one decimal
    (integers are printed as they are). The "± std" part is shown when std is not None, unless the
    row's `seeds_key` entry says it aggregates a single seed (a std of one value means nothing).

    Args:
        rows: one mapping per table line; a missing key is printed as "–".
        columns: `(key, header)` pairs, in display order.
        percent_keys: keys whose values are fractions to print as percentages.
        seeds_key: row key holding the number of seeds behind the row, if any.

    Returns:
        `(text, markdown)`: an aligned plain-text table and a markdown table whose numeric columns
        are right-aligned.
    """
    if not columns:
        raise ValueError("compare_table needs at least one (key, header) column")
    percent_keys = frozenset(percent_keys)
    body = []
    for row in rows:
        seeds = row.get(seeds_key)
        show_std = not (isinstance(seeds, numbers.Real) and seeds <= 1)
        body.append([_format_cell(key, row.get(key), percent_keys, show_std) for key, _ in columns])
    headers = [header for _, header in columns]
    # A column with any non-text value is numeric: right-aligned in both tables.
    numeric = [any(not isinstance(row.get(key), (str, type(None))) for row in rows) for key, _ in columns]

    widths = [max([len(h)] + [len(line[c]) for line in body]) for c, h in enumerate(headers)]

    def text_line(cells: Sequence[str]) -> str:
        parts = [s.rjust(w) if num else s.ljust(w) for s, w, num in zip(cells, widths, numeric)]
        return "  ".join(parts).rstrip()

    text = [text_line(headers), "  ".join("-" * w for w in widths)]
    text += [text_line(line) for line in body]

    def md_line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |"

    markdown = [md_line(headers), "|" + "|".join(" ---: " if num else " --- " for num in numeric) + "|"]
    markdown += [md_line(line) for line in body]
    return "\n".join(text), "\n".join(markdown)
