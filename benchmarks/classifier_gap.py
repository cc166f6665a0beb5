"""Where a finished class-incremental run loses accuracy: in its features or in its classifier.

    python benchmarks/classifier_gap.py RUN_DIR [RUN_DIR ...] [--json FILE] [--max-per-class N]

Each RUN_DIR is the output of `cmtl run` (its `config.yaml` and `snapshot/`). The final backbone
stays as it is; only the classifier on top changes:

- `run`: the run's own head, on the run's own evaluation split (test or validation).
- `realigned`: the head re-fitted by classifier alignment (`cmtl.alignment`, the run's
  `alignment_samples`, `alignment_shrinkage` and `alignment_covariance`) on every class's
  statistics taken now, through the final backbone, from the training images the stream offered.
  Alignment during the run had each class's statistics from the end of its own task, moved by the
  drift measured on the memory; the difference to `run` is what their staleness costs.
- `probe`: a logistic regression fitted on the real final features of those same training images
  (what a classifier trained on all of them at once reaches with these features); the difference
  to `realigned` is what replacing the images by class Gaussians costs.

`--max-per-class N` takes N training images per class instead of the run's `max_per_class` (a
ceiling with more data than the stream offered); `--set strategy.alignment_samples=4096` (any
config key) re-aligns with other settings than the run had. Prints one row per run and writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from cmtl.alignment import ClassStatistics, align_classifier
from cmtl.config import load_config
from cmtl.continual import class_features
from cmtl.runner import build_stream
from cmtl.snapshot import load_snapshot


def features(snapshot, datasets, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Final pre-logit features and global labels of every sample of `datasets` (eval transform)."""
    batches = (b[:2] for ds in datasets for b in DataLoader(ds.eval(), batch_size=batch_size))
    return class_features(snapshot, batches)


def accuracy(heads, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((heads(x, None).argmax(1) == y).float().mean()) * 100


def gap(run: Path, max_per_class: int | None = None, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """The three accuracies of one class-incremental run (see the module docstring); `overrides`
    (`key=value`) change the run's config before the data and the re-alignment are built."""
    overrides = [*overrides, "scenario.augment=false"]
    if max_per_class is not None:
        overrides.append(f"scenario.max_per_class={max_per_class}")
    cfg = load_config(run / "config.yaml", overrides)
    if cfg.scenario.mode != "cil":
        raise SystemExit(f"{run}: scenario.mode is {cfg.scenario.mode!r}; valid: cil (one growing head)")
    snap = load_snapshot(run / "snapshot")
    stream = build_stream(cfg, snap.backbone, mean=list(snap.mean), std=list(snap.std))
    bench = stream.benchmark
    train_x, train_y = features(snap, [e.dataset for e in bench.train_stream])
    test_x, test_y = features(snap, [e.dataset for e in bench.test_stream])
    heads, st = snap.task_heads, cfg.strategy
    out = {"run": str(run), "strategy": st.name, "seed": cfg.seed, "evaluation": stream.evaluation}
    out["train_per_class"] = len(train_y) / stream.num_classes
    out["run_accuracy"] = accuracy(heads, test_x, test_y)
    realigned = copy.deepcopy(heads)
    stats = ClassStatistics(st.alignment_shrinkage, st.alignment_covariance)
    stats.update(train_x, train_y)
    generator = torch.Generator().manual_seed(stream.num_tasks - 1)  # as the run's last re-fit
    align_classifier(realigned, stats, st.alignment_samples, generator)
    out["realigned_accuracy"] = accuracy(realigned, test_x, test_y)
    probe = copy.deepcopy(heads)
    probe.fit(train_x, train_y, tasks=range(0, len(probe.heads)))
    out["probe_accuracy"] = accuracy(probe, test_x, test_y)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="`cmtl run` output directories")
    parser.add_argument("--max-per-class", type=int, default=None, help="training images per class")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'run':50s} {'train/class':>11s} {'run':>6s} {'realigned':>9s} {'probe':>6s}")
    for run in args.runs:
        r = gap(run, args.max_per_class, args.set)
        rows.append(r)
        print(
            f"{str(run)[-50:]:50s} {r['train_per_class']:11.0f} {r['run_accuracy']:6.1f} "
            f"{r['realigned_accuracy']:9.1f} {r['probe_accuracy']:6.1f}",
            flush=True,
        )
    if len(rows) > 1:
        keys = ("run_accuracy", "realigned_accuracy", "probe_accuracy")
        run, realigned, probe = (sum(r[k] for r in rows) / len(rows) for k in keys)
        print(f"{'mean':50s} {'':11s} {run:6.1f} {realigned:9.1f} {probe:6.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
