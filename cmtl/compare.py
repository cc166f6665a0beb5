"""`cmtl compare`: several strategies on the same config, data and seeds; a table and its files."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmtl.config import STRATEGY_NAMES, ConfigError, ExperimentConfig
from cmtl.registry import closest

COLUMNS = [
    ("strategy", "strategy"),
    ("final_average_accuracy", "final acc (%)"),
    ("average_incremental_accuracy", "avg inc acc (%)"),
    ("forgetting", "forgetting (pt)"),
    ("bwt", "BWT (pt)"),
    ("wall_time_total", "time (s)"),
    ("trainable_parameters", "trainable params/task"),
]


def parse_strategies(text: str | Sequence[str] | None) -> list[str]:
    """Comma-separated strategy names (None: all), each checked against the registered ones."""
    if text is None:
        return list(STRATEGY_NAMES)
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"--strategies is empty; valid: {', '.join(STRATEGY_NAMES)}")
    for n in names:
        if n not in STRATEGY_NAMES:
            near = closest(n, list(STRATEGY_NAMES))
            hint = f" (did you mean {near!r}?)" if near else ""
            raise ConfigError(f"unknown strategy {n!r}{hint}; valid: {', '.join(STRATEGY_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies lists a strategy twice: {','.join(names)}")
    return names


def run_compare(
    cfg: ExperimentConfig,
    strategies: Sequence[str],
    seeds: int = 1,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every strategy with seeds cfg.seed, cfg.seed+1, ...; write compare.json and compare.md."""
    from cmtl.metrics import compare_table, mean_std
    from cmtl.runner import run_experiment, write_json

    if seeds < 1:
        raise ConfigError(f"--seeds is {seeds}; valid: an int >= 1")
    root = Path(out) if out is not None else Path(cfg.out) / f"{cfg.name}_compare"
    if (root / "compare.json").exists():
        raise ConfigError(f"{str(root)!r} already holds a comparison; choose another --out or delete it")
    seed_list = [cfg.seed + k for k in range(seeds)]
    runs: dict[str, list[dict[str, Any]]] = {}
    for name in strategies:
        for seed in seed_list:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.strategy.name, run_cfg.seed = name, seed
            run_cfg.name = f"{name}_seed{seed}"
            res = run_experiment(run_cfg, out=root / run_cfg.name, echo=lambda _msg: None, progress=False)
            runs.setdefault(name, []).append(res)
            forgetting = res["forgetting"]
            echo(
                f"{name:16s} seed {seed}: final acc {100 * res['final_average_accuracy']:.1f}%, forgetting "
                + ("n/a" if forgetting is None else f"{100 * forgetting:.1f}")
                + f", {res['wall_time_total']:.0f}s"
            )
    rows = []
    for name, results in runs.items():
        row: dict[str, Any] = {"strategy": name, "num_seeds": len(results)}
        for key in (
            "final_average_accuracy",
            "average_incremental_accuracy",
            "forgetting",
            "bwt",
            "wall_time_total",
        ):
            row[key] = mean_std([r[key] for r in results])
        row["trainable_parameters"] = max(max(r["trainable_parameters_per_task"] or [0]) for r in results)
        rows.append(row)
    text, markdown = compare_table(rows, COLUMNS)
    summary = {
        "config": cfg.name,
        "seeds": seed_list,
        "strategies": list(strategies),
        "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
        "runs": {n: [r["accuracy_matrix"] for r in rs] for n, rs in runs.items()},
    }
    write_json(root / "compare.json", summary)
    header = f"# cmtl compare: {cfg.name}\n\nseeds {seed_list}; mean ± std over seeds.\n\n"
    (root / "compare.md").write_text(header + markdown + "\n", encoding="utf-8")
    echo(text)
    echo(f"wrote {root / 'compare.json'} and {root / 'compare.md'}")
    return summary
