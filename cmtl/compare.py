"""`cmtl compare`: several strategies on the same config, data and seeds; a table and its files."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cmtl.config import STRATEGY_NAMES, ConfigError, ExperimentConfig
from cmtl.registry import did_you_mean

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
            hint = did_you_mean(n, list(STRATEGY_NAMES))
            raise ConfigError(f"unknown strategy {n!r}{hint}; valid: {', '.join(STRATEGY_NAMES)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies lists a strategy twice: {','.join(names)}")
    return names


def _echo_run(echo: Callable[[str], None], res: dict[str, Any]) -> None:
    forgetting = res["forgetting"]
    echo(
        f"{res['strategy']:16s} seed {res['seed']}: final acc {100 * res['final_average_accuracy']:.1f}%, "
        "forgetting "
        + ("n/a" if forgetting is None else f"{100 * forgetting:.1f}")
        + f", {res['wall_time_total']:.0f}s"
    )


def _paired(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Final accuracy of the first strategy minus each other's, seed by seed (None: < 2 seeds)."""
    from cmtl.metrics import paired_differences

    names = list(runs)
    if len(names) < 2:
        return None
    per_seed = {n: {r["seed"]: r["final_average_accuracy"] for r in rs} for n, rs in runs.items()}
    against = {n: paired_differences(per_seed[names[0]], per_seed[n]) for n in names[1:]}
    if any(v is None for v in against.values()):
        return None
    return {"reference": names[0], "metric": "final_average_accuracy", "against": against}


def _paired_table(paired: dict[str, Any]) -> tuple[str, str]:
    """The paired differences as a terminal and a markdown table."""
    from cmtl.metrics import compare_table

    ref = paired["reference"]
    rows = [
        {
            "strategy": name,
            "lead": f"{100 * d['mean']:+.1f} ± {100 * d['standard_error']:.1f}",
            "per_seed": " / ".join(f"{100 * x:+.1f}" for x in d["differences"]),
            "ahead": f"{d['ahead']} of {len(d['seeds'])}",
        }
        for name, d in paired["against"].items()
    ]
    columns = [
        ("strategy", "strategy"),
        ("lead", f"{ref} − strategy, final acc (pt, ± s.e.)"),
        ("per_seed", "per seed (pt)"),
        ("ahead", f"{ref} ahead on"),
    ]
    return compare_table(rows, columns)


BUDGET_KEYS = ("buffer_size", "buffer_per_class")


def memory_budgets(cfg: ExperimentConfig, strategies: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The memory each strategy trains with (`per_strategy` applied), for those that keep one.

    A strategy keeps a memory when it has a QR buffer (emtal and its ablations but emtal_no_qr, der)
    or Avalanche's replay memory; the others are left out.
    """
    from cmtl.recipes import strategy_spec

    out = {}
    for name in strategies:
        st = cfg.strategy.resolved(name)  # checks the section as `name` trains with it
        spec = strategy_spec(name, cfg.model, cfg.strategy, cfg.seed)
        if spec.emtal.qr is not None or spec.avalanche == "replay":
            out[name] = {k: getattr(st, k) for k in BUDGET_KEYS}
    return out


def unequal_budget_keys(budgets: dict[str, dict[str, Any]]) -> list[str]:
    """The keys of `BUDGET_KEYS` on which the strategies' memories differ."""
    return [k for k in BUDGET_KEYS if len({b[k] for b in budgets.values()}) > 1]


def check_equal_budgets(budgets: dict[str, dict[str, Any]]) -> None:
    """Refuse strategies whose memories differ (ConfigError naming each one's): a comparison at one budget."""
    unequal = unequal_budget_keys(budgets)
    if unequal:
        key = unequal[0]
        each = ", ".join(f"{n} {b[key]}" for n, b in budgets.items())
        raise ConfigError(
            f"strategy.per_strategy gives the strategies with a memory different {key}s ({each}); "
            "valid: one value for all of them, or --unequal-budgets to compare anyway"
        )


def _settings_text(settings: dict[str, dict[str, Any]]) -> str:
    """`{strategy: {key: value}}` as one line: `der: a=1, b=2; replay: a=3`."""
    return "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in kv.items()) for n, kv in settings.items())


def _run_one(cfg: ExperimentConfig, out: Path, resume: bool, threads: int | None) -> dict[str, Any]:
    """One (strategy, seed) run; a finished one is read back, an unfinished one resumed if asked."""
    import json

    from cmtl.checkpoint import CHECKPOINT_NAME
    from cmtl.runner import run_experiment

    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    if resume and (out / "results.json").is_file():
        from cmtl.config import config_to_dict, load_config
        from cmtl.runner import config_difference

        diff = config_difference(config_to_dict(cfg), config_to_dict(load_config(out / "config.yaml")))
        if diff:
            raise ConfigError(f"--resume: the finished run in {str(out)!r} has another config at {diff}")
        return json.loads((out / "results.json").read_text())
    again = resume and (out / CHECKPOINT_NAME).is_file()
    return run_experiment(cfg, out=out, echo=lambda _msg: None, progress=False, resume=again)


def run_compare(
    cfg: ExperimentConfig,
    strategies: Sequence[str],
    seeds: int = 1,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
    jobs: int = 1,
    resume: bool = False,
    unequal_budgets: bool = False,
) -> dict[str, Any]:
    """Run every strategy with seeds cfg.seed, cfg.seed+1, ...; write compare.json and compare.md.

    With two seeds or more a second table compares the first strategy with each other one seed by
    seed (same data, subsample and order per seed): the mean difference of final accuracy, its
    standard error and on how many seeds the first is ahead.

    `jobs` > 1 runs that many runs at once in separate processes, sharing the CPU threads among
    them (results do not depend on it: every run is seeded). `resume=True` keeps finished runs,
    continues interrupted ones from their checkpoints and runs the rest.

    Every strategy that keeps a memory must keep the same one (`buffer_size`, `buffer_per_class`):
    a `strategy.per_strategy` entry that changes it is refused (ConfigError, before anything is
    written) unless `unequal_budgets=True`; compare.json and compare.md then say so.
    """
    import os
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from cmtl.metrics import compare_table, mean_std
    from cmtl.runner import write_json

    if seeds < 1:
        raise ConfigError(f"--seeds is {seeds}; valid: an int >= 1")
    if jobs < 1:
        raise ConfigError(f"--jobs is {jobs}; valid: an int >= 1")
    root = Path(out) if out is not None else Path(cfg.out) / f"{cfg.name}_compare"
    if (root / "compare.json").exists() and not resume:
        raise ConfigError(
            f"{str(root)!r} already holds a comparison; choose another --out, delete it or pass --resume"
        )
    budgets = memory_budgets(cfg, strategies)
    if not unequal_budgets:
        check_equal_budgets(budgets)
    seed_list = [cfg.seed + k for k in range(seeds)]
    planned = []
    for name in strategies:
        for seed in seed_list:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.strategy.name, run_cfg.seed = name, seed
            run_cfg.name = f"{name}_seed{seed}"
            planned.append(run_cfg)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    results: list[dict[str, Any]] = []
    if jobs == 1:
        results = [_run_one(c, root / c.name, resume, None) for c in planned]
        for res in results:
            _echo_run(echo, res)
    else:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_run_one, c, root / c.name, resume, threads) for c in planned]
            for f in futures:  # in plan order, so the table does not depend on `jobs`
                results.append(f.result())
                _echo_run(echo, results[-1])
    runs: dict[str, list[dict[str, Any]]] = {}
    for c, res in zip(planned, results):
        runs.setdefault(c.strategy.name, []).append(res)
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
    paired = _paired(runs)
    summary = {
        "config": cfg.name,
        "seeds": seed_list,
        "strategies": list(strategies),
        "rows": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in r.items()} for r in rows],
        "runs": {n: [r["accuracy_matrix"] for r in rs] for n, rs in runs.items()},
        "paired": paired,
        # settings that only some strategies trained with (`strategy.per_strategy`)
        "per_strategy": {
            n: dict(cfg.strategy.per_strategy[n]) for n in runs if cfg.strategy.per_strategy.get(n)
        },
        # what each strategy with a memory kept (samples over all tasks, cap per class)
        "memory": budgets,
        "equal_budgets": not unequal_budget_keys(budgets),
    }
    write_json(root / "compare.json", summary)
    # what the runs were evaluated on (a multi_dataset entry may set its own validation split)
    split = "/".join(sorted({r.get("evaluated_on", "test") for rs in runs.values() for r in rs}))
    header = f"# cmtl compare: {cfg.name}\n\nseeds {seed_list}; mean ± std over seeds; {split} split.\n\n"
    if summary["per_strategy"]:
        own = _settings_text(summary["per_strategy"])
        header += f"Own settings (`strategy.per_strategy`), the rest as configured: {own}.\n\n"
    if not summary["equal_budgets"]:
        header += f"**Unequal memory budgets** (`--unequal-budgets`): {_settings_text(budgets)}.\n\n"
    if paired:
        paired_text, paired_md = _paired_table(paired)
        text += "\n\n" + paired_text
        markdown += "\n\n" + paired_md
    (root / "compare.md").write_text(header + markdown + "\n", encoding="utf-8")
    echo(text)
    echo(f"wrote {root / 'compare.json'} and {root / 'compare.md'}")
    return summary
