"""Seconds to MoEfy ViT-B/16-shaped weights (12 blocks, 3072 x 768 MLPs) into 16 experts.

Run: python benchmarks/moefy.py [--experts 16] [--depth 12]
"""

import argparse
import time

import torch
from timm.models.vision_transformer import VisionTransformer

from cmtl.moefy import moefy_vit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--depth", type=int, default=12)
    args = ap.parse_args()
    torch.manual_seed(0)
    vit = VisionTransformer(num_classes=0, depth=args.depth).eval()  # ViT-B/16 shapes
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = vit(x)
    start = time.perf_counter()
    moefy_vit(vit, args.experts, seed=0)
    secs = time.perf_counter() - start
    with torch.no_grad():
        diff = (vit(x) - ref).abs().max().item()
    print(
        f"moefy ViT-B/16 shapes ({args.depth} x 3072 x 768, E={args.experts}): {secs:.1f} s "
        f"(goal <= 60 s); max |output change| {diff:.2e}; threads {torch.get_num_threads()}"
    )


if __name__ == "__main__":
    main()
