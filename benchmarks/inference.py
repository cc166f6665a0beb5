"""Images/s of a plain timm ViT, the routed model (open adapters + routers) and the consolidated
model, measured in one run, with ratios to plain.

Run: python benchmarks/inference.py [--batch 64] [--repeats 5]
"""

import argparse
import copy
import time

import torch
from timm.models.vision_transformer import VisionTransformer

from cmtl.model import AdapterConfig, CMTLModel

SHAPES = {
    "tiny-32px": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit-b16-224": dict(),
}


@torch.no_grad()
def images_per_second(fn, x, repeats: int) -> float:
    fn(x)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        best = min(best, time.perf_counter() - start)
    return x.shape[0] / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        kw = SHAPES[name]
        plain = VisionTransformer(num_classes=10, **kw).eval()
        size = kw.get("img_size", 224)
        batch = args.batch if name.startswith("tiny") else max(1, args.batch // 8)
        x = torch.randn(batch, 3, size, size)
        model = CMTLModel(copy.deepcopy(plain), AdapterConfig(num_experts=16, rank=4)).eval()
        model.add_task(10)
        for p in model.adapter_parameters():  # non-zero weights so nothing is skipped
            torch.nn.init.normal_(p, std=0.01)
        routed = images_per_second(lambda t, m=model: m(t, 0), x, args.repeats)
        model.set_fading(0.0)
        model.consolidate()
        merged = model.backbone
        merged.reset_classifier(10)
        plain_ips = images_per_second(plain, x, args.repeats)
        merged_ips = images_per_second(merged, x, args.repeats)
        print(
            f"{name} batch {batch}: plain {plain_ips:.1f} img/s, routed {routed:.1f} img/s, "
            f"consolidated {merged_ips:.1f} img/s | time ratio routed/plain {plain_ips / routed:.3f} "
            f"(goal <= 1.5), consolidated/plain {plain_ips / merged_ips:.3f} (goal <= 1.02)"
        )


if __name__ == "__main__":
    main()
