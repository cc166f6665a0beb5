"""cmtl command line: run, compare, eval and inspect continual multi-task experiments.

    cmtl run [CONFIG] [--set KEY=VALUE ...] [--out DIR]
    cmtl compare [CONFIG] [--strategies emtal,naive,...] [--seeds N] [--out DIR] [--unequal-budgets]
    cmtl eval SNAPSHOT --config CONFIG
    cmtl inspect SNAPSHOT

Bad input (config, paths, snapshots) prints one `cmtl: error: ...` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from cmtl.config import ConfigError, load_config

EXIT_USAGE = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from cmtl.runner import run_experiment

    config = args.config
    if args.resume and config is None:  # continue with the run's own resolved config
        default = load_config(None, args.overrides)
        run_dir = Path(args.out) if args.out else Path(default.out) / default.name
        if (run_dir / "config.yaml").is_file():
            config = str(run_dir / "config.yaml")
    cfg = load_config(config, args.overrides)
    run_experiment(cfg, out=args.out, progress=False if args.no_progress else None, resume=args.resume)
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from cmtl.compare import parse_strategies, run_compare

    cfg = load_config(args.config, args.overrides)
    strategies = parse_strategies(args.strategies)
    run_compare(
        cfg,
        strategies,
        seeds=args.seeds,
        out=args.out,
        jobs=args.jobs,
        resume=args.resume,
        unequal_budgets=args.unequal_budgets,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from cmtl.runner import evaluate_snapshot
    from cmtl.snapshot import load_snapshot

    snapshot = load_snapshot(args.snapshot)
    cfg = load_config(args.config, args.overrides)
    accs = evaluate_snapshot(snapshot, cfg)
    for j, acc in enumerate(accs):
        print(f"task {j}: accuracy {100 * acc:.2f}%")
    print(f"average accuracy {100 * sum(accs) / len(accs):.2f}%")
    return 0


def _size(path: Path) -> str:
    n = path.stat().st_size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from cmtl.metrics import format_matrix
    from cmtl.snapshot import load_snapshot

    snap = load_snapshot(args.snapshot)
    meta = snap.meta
    if args.json:
        print(json.dumps(meta, indent=2))
        return 0
    params = sum(p.numel() for p in snap.backbone.parameters())
    heads = sum(p.numel() for p in snap.heads.parameters())
    print(f"snapshot {args.snapshot}")
    print(f"  architecture  {meta.get('architecture')} ({params:,} backbone parameters, {heads:,} in heads)")
    print(f"  input         {meta.get('image_size')} px, mean {meta.get('mean')}, std {meta.get('std')}")
    print(f"  stream        {meta.get('scenario')} ({snap.mode}), strategy {meta.get('strategy')}")
    for t, classes in enumerate(snap.task_classes):
        shown = ", ".join(classes[:8]) + (", ..." if len(classes) > 8 else "")
        print(f"  task {t:<3d}      {len(classes)} classes: {shown}")
    metrics = meta.get("metrics") or {}
    if metrics.get("accuracy_matrix"):
        print("  accuracy matrix (%):")
        print("    " + format_matrix(metrics["accuracy_matrix"]).replace("\n", "\n    "))
    for key in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "bwt"):
        if metrics.get(key) is not None:
            print(f"  {key:28s} {100 * metrics[key]:.2f}")
    print(f"  versions      {meta.get('versions')}")
    for f in sorted(Path(args.snapshot).iterdir()):
        print(f"  file          {f.name} ({_size(f)})")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmtl", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
        if positional:
            p.add_argument(
                "config", nargs="?", default=None, help="YAML file (default: the embedded default)"
            )
        p.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key"
        )
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)

    p = sub.add_parser("run", help="train a task stream and write a run directory")
    config_args(p)
    p.add_argument("--out", default=None, help="run directory (default: <out>/<name> from the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("compare", help="several strategies on the same data and seeds")
    config_args(p)
    p.add_argument("--strategies", default=None, help="comma-separated names (default: all)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds, from the config's seed up")
    p.add_argument("--out", default=None, help="directory (default: <out>/<name>_compare)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, in separate processes (default: 1)")
    p.add_argument(
        "--resume", action="store_true", help="keep finished runs in --out, continue interrupted ones"
    )
    p.add_argument(
        "--unequal-budgets",
        action="store_true",
        help="let strategy.per_strategy give strategies other memories (buffer_size, buffer_per_class)",
    )
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("eval", help="test accuracy of a snapshot on a config's stream")
    p.add_argument("snapshot")
    p.add_argument("--config", default=None, help="YAML file of the stream (default: the embedded default)")
    config_args(p, positional=False)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("inspect", help="what a snapshot holds")
    p.add_argument("snapshot")
    p.add_argument("--json", action="store_true", help="print meta.json")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_inspect)
    return parser


def _report(msg: str) -> None:
    """Print an error on stderr; under torchrun only rank 0 does, so it appears once."""
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
    if not args.debug:
        warnings.filterwarnings("ignore")  # library deprecation chatter; --debug shows it
    from cmtl.runner import RunInterrupted

    try:
        return args.func(args)
    except RunInterrupted as e:
        _report(f"cmtl: {e}")
        return 130
    except (ConfigError, ValueError, OSError, TypeError) as e:
        if args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if isinstance(e, OSError) and e.filename and str(e.filename) not in msg:
            msg = f"{msg}: {e.filename}"
        _report(f"cmtl: error: {msg}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        _report("cmtl: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
