"""Inference speed: plain timm ViT, routed model (open adapters + routers), consolidated snapshot.

    python benchmarks/inference.py [--shapes tiny-32px,vit-b16-224] [--batches 1,64] [--repeats 7]
                                   [--adapters 1] [--json FILE]

For each shape and batch size, in one run: latency (the fastest and the median seconds per forward
over `--repeats` rounds after a warm-up round, the models taking turns in every round) and images/s
(from the fastest) of

- `plain`: a timm `VisionTransformer` with a 10-class head, never touched by cmtl;
- `routed`: the same backbone MoEfied (E=16, rank 4) with `--adapters` open task adapters (LoRA
  experts, token routers at full strength, attention LoRA), non-zero weights, and a 10-class head:
  the model as it is while a task trains and before consolidation;
- `snapshot`: that routed model faded, consolidated and written with `cmtl.snapshot.save_snapshot`,
  then loaded back by plain timm (`timm.create_model("local-dir:...")`, no cmtl code involved) with
  the task head from `heads.safetensors`: what a user deploys.

Ratios are ratios of the fastest times against `plain` in the same run (goal: snapshot <= 1.02).
Each model's floating-point operations per forward are counted too (torch's `FlopCounterMode`:
matmuls, convolutions, attention), which unlike time do not depend on what else the machine is
doing: the snapshot's count equals plain timm's exactly, since it is the same network.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch.utils.flop_counter import FlopCounterMode

from cmtl.model import AdapterConfig, CMTLModel
from cmtl.snapshot import save_snapshot

SHAPES = {
    "tiny-32px": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit-b16-224": dict(),  # timm's vit_base_patch16_224 layout
}


@torch.inference_mode()
def latencies(models: dict, x: torch.Tensor, repeats: int) -> dict[str, tuple[float, float]]:
    """(fastest, median) seconds per forward of each model on `x` over `repeats` rounds.

    One warm-up round first. The models take turns inside every round, so a slow spell of the
    machine (other processes, a shared host) hits all of them alike instead of whichever was being
    timed; the fastest of the rounds is the least disturbed measurement of each model's own cost.
    """
    times: dict[str, list[float]] = {name: [] for name in models}
    for fn in models.values():
        fn(x)
    for _ in range(repeats):
        for name, fn in models.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: (min(t), sorted(t)[len(t) // 2]) for name, t in times.items()}


@torch.inference_mode()
def flop_counts(models: dict, x: torch.Tensor) -> dict[str, int]:
    """Floating-point operations of one forward of each model on `x` (exact, machine-independent)."""
    counts = {}
    for name, fn in models.items():
        with FlopCounterMode(display=False) as counter:
            fn(x)
        counts[name] = counter.get_total_flops()
    return counts


class _WithHead(torch.nn.Module):
    """A timm feature backbone (`num_classes=0`) followed by a task head, as a deployed model is."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_models(kw: dict, adapters: int, workdir: Path) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    plain = VisionTransformer(num_classes=10, **kw).eval()
    backbone = copy.deepcopy(plain)
    backbone.reset_classifier(0)
    routed = CMTLModel(backbone, AdapterConfig(num_experts=16, rank=4, attn_lora=True))
    for _ in range(adapters):
        routed.add_task(10)
    for name, p in routed.named_parameters():  # non-zero adapters and routers, so nothing is skipped
        if "lora_" in name or "router" in name:
            torch.nn.init.normal_(p, std=0.01)
    routed.eval()
    merged = copy.deepcopy(routed)
    merged.set_fading(0.0)
    merged.consolidate()
    snap_dir = save_snapshot(merged, workdir / "snapshot", meta={})
    loaded = timm.create_model(f"local-dir:{snap_dir}", pretrained=True).eval()
    heads = load_file(str(snap_dir / "heads.safetensors"))
    head = torch.nn.Linear(heads["task0.weight"].shape[1], heads["task0.weight"].shape[0])
    head.load_state_dict({"weight": heads["task0.weight"], "bias": heads["task0.bias"]})
    snapshot = _WithHead(loaded, head).eval()
    with torch.inference_mode():  # the snapshot computes what the faded model computes
        x = torch.randn(2, 3, kw.get("img_size", 224), kw.get("img_size", 224))
        gap = (snapshot(x) - merged(x, 0)).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"the snapshot loaded by timm differs from the consolidated model by {gap:.2e}")
    return {"plain": plain, "routed": lambda t, m=routed: m(t, 0), "snapshot": snapshot}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {', '.join(SHAPES)}")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--adapters", type=int, default=1, help="open task adapters in the routed model")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = args.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            ap.error(f"unknown shape {name!r}; valid: {', '.join(SHAPES)}")
    batches = [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    report = {
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "adapters": args.adapters,
        "rows": [],
    }
    print(
        f"{'shape':12s} {'batch':>5s} {'model':9s} {'fastest ms':>11s} {'median ms':>10s} "
        f"{'img/s':>9s} {'x plain':>8s} {'GFLOPs':>9s} {'FLOPs x plain':>13s}"
    )
    for name in shapes:
        kw = SHAPES[name]
        size = kw.get("img_size", 224)
        with tempfile.TemporaryDirectory() as tmp:
            models = build_models(kw, args.adapters, Path(tmp))
            for batch in batches:
                x = torch.randn(batch, 3, size, size)
                flops = flop_counts(models, x)
                times = latencies(models, x, args.repeats)
                for model, (fastest, median) in times.items():
                    ratio = fastest / times["plain"][0]
                    flop_ratio = flops[model] / flops["plain"]
                    print(
                        f"{name:12s} {batch:5d} {model:9s} {1e3 * fastest:11.2f} {1e3 * median:10.2f} "
                        f"{batch / fastest:9.1f} {ratio:8.3f} {flops[model] / 1e9:9.3f} {flop_ratio:13.4f}"
                    )
                    report["rows"].append(
                        dict(
                            shape=name,
                            batch=batch,
                            model=model,
                            latency_s=fastest,
                            median_latency_s=median,
                            images_per_s=batch / fastest,
                            time_ratio_to_plain=ratio,
                            flops=flops[model],
                            flop_ratio_to_plain=flop_ratio,
                        )
                    )
    print("goal: snapshot <= 1.02x plain (time); its FLOPs equal plain's")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
