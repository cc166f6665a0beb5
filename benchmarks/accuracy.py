"""Every strategy on the dev streams of ../shared/data, same backbone, data, seeds and buffer budget.

    python benchmarks/accuracy.py [--seeds 3] [--streams fmnist_til,fmnist_cil,mnist_fashion]
                                  (also smnist_til, smnist_cil: Split MNIST)
                                  [--strategies emtal,naive,...] [--set KEY=VALUE ...] [--out DIR]
                                  [--jobs N] [--resume] [--max-per-class 60] [--max-test-per-class 100]

Runs `cmtl compare` on each dev config (configs/dev_*.yaml), prints the tables and writes
`<out>/accuracy.json` plus each comparison's compare.md / compare.json. Not a test. By default every
strategy runs on every stream with 3 seeds, subsampled to 60 training and 100 test images per class:
with `--jobs 2` that was about an hour on 2 CPU cores while every config trained 3 epochs per task.
The class-incremental configs train 10 since session 29 (replayed buffer images augmented), which
makes `fmnist_cil` about three times longer, and so do `mnist_fashion` since session 32,
`fmnist_til` since session 37 and `smnist_til` since session 31 (30 epochs since session 35: nine
times); `smnist_cil` trains 20 since session 39, with every pre-trained weight trained by the
adapter strategies (`tune_base`). `--set strategy.epochs=3`
gives the old budget (and the old, under-trained baselines). `--set scenario.max_per_class=...`
(or the flags) change the subsampling; the dev configs' own values (500 / 300) are for longer runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STREAMS = {
    "fmnist_til": "configs/dev_fashion_mnist_til.yaml",
    "fmnist_cil": "configs/dev_fashion_mnist_cil.yaml",
    "mnist_fashion": "configs/dev_mnist_fashion.yaml",
    "smnist_til": "configs/dev_split_mnist_til.yaml",
    "smnist_cil": "configs/dev_split_mnist_cil.yaml",
}
# the one-hour comparison of the evidence issue; the Split MNIST streams run on request (--streams)
DEFAULT_STREAMS = ("fmnist_til", "fmnist_cil", "mnist_fashion")


def main(argv: list[str] | None = None) -> int:
    from cmtl.compare import parse_strategies, run_compare
    from cmtl.config import load_config
    from cmtl.runner import versions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--streams", default=",".join(DEFAULT_STREAMS), help=f"of {', '.join(STREAMS)}")
    p.add_argument("--strategies", default=None, help="comma-separated (default: all)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_accuracy"))
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores/jobs threads)")
    p.add_argument("--resume", action="store_true", help="keep finished runs, continue interrupted ones")
    p.add_argument("--max-per-class", type=int, default=60, help="training images per class")
    p.add_argument("--max-test-per-class", type=int, default=100, help="test images per class")
    args = p.parse_args(argv)
    # the subsampling goes first so that an explicit --set of the same key wins
    args.overrides = [
        f"scenario.max_per_class={args.max_per_class}",
        f"scenario.max_test_per_class={args.max_test_per_class}",
        *args.overrides,
    ]
    strategies = parse_strategies(args.strategies)
    out = Path(args.out).resolve()
    os.chdir(ROOT)  # the dev configs name ../shared/data relative to the project root
    report = {"versions": versions(), "seeds": args.seeds, "overrides": args.overrides, "streams": {}}
    for stream in args.streams.split(","):
        if stream not in STREAMS:
            print(f"unknown stream {stream!r}; valid: {', '.join(STREAMS)}", file=sys.stderr)
            return 2
        cfg = load_config(ROOT / STREAMS[stream], args.overrides)
        print(f"== {stream} ({STREAMS[stream]}) ==", flush=True)
        t0 = time.time()
        summary = run_compare(
            cfg, strategies, seeds=args.seeds, out=out / stream, jobs=args.jobs, resume=args.resume
        )
        summary["wall_time"] = time.time() - t0
        report["streams"][stream] = summary
        (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
