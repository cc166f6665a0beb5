"""Command line: `cmtl demo` (the YAML runner `cmtl run` is being built).

`cmtl demo` trains the default tiny ViT on the embedded digits stream with one adapter per task,
fades the routers, consolidates after every task, and prints the task-incremental accuracy matrix.
No QR buffer yet: it shows the model's grow / fade / merge cycle end to end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cmtl.config import ConfigError, load_config
from cmtl.continual import fading_coefficient
from cmtl.model import AdapterConfig, CMTLModel


@torch.no_grad()
def _accuracy(model: CMTLModel, dataset, task: int, batch_size: int) -> float:
    model.eval()
    correct = total = 0
    for x, y, _ in DataLoader(dataset, batch_size=batch_size):
        correct += (model(x, task).argmax(-1) == y).sum().item()
        total += len(y)
    return correct / max(total, 1)


def demo(config: str | None, overrides: list[str]) -> int:
    from cmtl.scenarios import create_scenario

    cfg = load_config(config, overrides)
    torch.manual_seed(cfg.seed)
    mc, sc, st = cfg.model, cfg.scenario, cfg.strategy
    adapter = AdapterConfig(
        num_experts=mc.num_experts, rank=mc.rank, alpha=mc.alpha, tau=mc.tau, attn_lora=mc.attn_lora
    )
    model = CMTLModel.from_timm(
        mc.name, pretrained=mc.pretrained, checkpoint=mc.checkpoint, adapter=adapter, mode="til", **mc.kwargs
    )
    size = model.backbone.patch_embed.img_size[0]
    stream = create_scenario(
        sc.name, mode="til", n_tasks=sc.n_tasks, image_size=size, seed=cfg.seed, **sc.options
    )
    train, test = stream.benchmark.train_stream, stream.benchmark.test_stream
    matrix = []
    for t, exp in enumerate(train):
        start = time.time()
        model.add_task(stream.classes_per_task[t])
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=st.lr, weight_decay=st.weight_decay)
        loader = DataLoader(exp.dataset, batch_size=st.batch_size, shuffle=True)
        steps, step = st.epochs * len(loader), 0
        for _ in range(st.epochs):
            model.train()
            for x, y, _ in loader:
                a = fading_coefficient(step, steps, st.fading_start, st.fading_end)
                model.set_fading(a, f"task{t}")
                loss = F.cross_entropy(model(x, t), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
        model.set_fading(0.0)
        model.consolidate()
        row = [_accuracy(model, test[j].dataset, j, st.eval_batch_size) for j in range(t + 1)]
        matrix.append(row)
        print(f"task {t}: acc {row[-1]:.3f}  avg {sum(row) / len(row):.3f}  ({time.time() - start:.1f}s)")
    print("accuracy matrix (row: after task i, column: task j)")
    for row in matrix:
        print("  " + " ".join(f"{a:.3f}" for a in row))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmtl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train the tiny default on the embedded digits stream")
    p.add_argument("config", nargs="?", default=None)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--debug", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING)
    try:
        return demo(args.config, args.overrides)
    except (ConfigError, ValueError) as e:
        if args.debug:
            raise
        print(f"cmtl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
