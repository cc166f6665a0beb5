"""A linear classifier on the input pixels: the floor a pre-trained backbone has to beat on a stream.

    python benchmarks/pixel_probe.py CONFIG [--set KEY=VALUE ...] [--seeds 0 1 2] [--json FILE]

Builds the stream of CONFIG with the overrides (per seed the same training and evaluation images
as `cmtl run` with those overrides), flattens every image after the eval transform (resized and
normalised, never augmented) and fits an L2-regularised multinomial logistic regression on the
pixels with L-BFGS: per task on that task's classes in task-incremental mode, as a task's own head
sees them; on every class at once in class-incremental mode, a joint reference. Prints each task's
accuracy on the stream's evaluation split and their mean, which is what `cmtl run` reports as the
final average accuracy. When a backbone fine-tuned on the stream ends below this, the stream
measures how badly the pre-trained features transfer, not how well a method keeps old tasks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models import get_pretrained_cfg
from torch.utils.data import DataLoader

from cmtl.config import ConfigError, ExperimentConfig, load_config
from cmtl.runner import build_stream


def pixels(dataset, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened eval-transformed images and global labels of `dataset`."""
    xs, ys = [], []
    for batch in DataLoader(dataset.eval(), batch_size=batch_size):
        xs.append(batch[0].flatten(1).float())
        ys.append(torch.as_tensor(batch[1]).long())
    return torch.cat(xs), torch.cat(ys)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, max_iter: int = 200):
    """Weights and bias of a multinomial logistic regression over the classes in `y`; returns them
    with those classes (ascending), so that `classes[argmax(x @ w + b)]` is the prediction."""
    classes, target = torch.unique(y, return_inverse=True)
    w = torch.zeros(x.shape[1], len(classes), requires_grad=True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, target) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach(), classes


def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    w, b, classes = model
    return float((classes[(x @ w + b).argmax(1)] == y).float().mean()) * 100


def input_format(cfg: ExperimentConfig) -> tuple[int, list | None, list | None]:
    """The side and normalisation `cmtl run` gives the stream's images: the config's, else the
    model's (its `img_size` keyword, else its timm pretrained config), without building the model."""
    pretrained = get_pretrained_cfg(cfg.model.name)
    size = cfg.scenario.image_size or cfg.model.kwargs.get("img_size")
    if size is None and pretrained is not None:
        size = pretrained.input_size[-1]
    if size is None:
        raise ConfigError(
            f"model.name {cfg.model.name!r} has no known input size; valid: set scenario.image_size"
        )
    mean = cfg.model.mean or (list(pretrained.mean) if pretrained is not None else None)
    std = cfg.model.std or (list(pretrained.std) if pretrained is not None else None)
    return int(size), mean, std


def probe(cfg: ExperimentConfig, l2: float = 1e-3) -> dict:
    """Each task's accuracy of the pixel classifier on the stream `cfg` describes (module docstring)."""
    size, mean, std = input_format(cfg)
    stream = build_stream(cfg, None, image_size=size, mean=mean, std=std)
    bench = stream.benchmark
    train = [pixels(e.dataset) for e in bench.train_stream]
    test = [pixels(e.dataset) for e in bench.test_stream]
    if cfg.scenario.mode == "cil":
        joint = fit_logistic(torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), l2)
        per_task = [accuracy(joint, x, y) for x, y in test]
    else:
        per_task = [accuracy(fit_logistic(*tr, l2), *te) for tr, te in zip(train, test, strict=True)]
    return {
        "seed": cfg.seed,
        "mode": cfg.scenario.mode,
        "evaluated_on": stream.evaluation,
        "train_per_class": sum(len(y) for _, y in train) / stream.num_classes,
        "task_accuracy": per_task,
        "final_average_accuracy": statistics.mean(per_task),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="an experiment YAML (configs/dev_*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the config's seed")
    parser.add_argument("--l2", type=float, default=1e-3, help="weight of the squared-weight penalty")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        seeds = args.seeds if args.seeds is not None else [cfg.seed]
        rows = [probe(load_config(args.config, [*args.set, f"seed={s}"]), args.l2) for s in seeds]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        tasks = " ".join(f"{a:5.1f}" for a in r["task_accuracy"])
        mean = r["final_average_accuracy"]
        print(f"seed {r['seed']:3d} ({r['mode']}, {r['evaluated_on']}): {tasks} | {mean:5.2f}")
    if len(rows) > 1:
        print(f"mean over seeds: {statistics.mean(r['final_average_accuracy'] for r in rows):.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
