"""Seconds per training step: EMTAL vs naive full fine-tuning vs one plain LoRA (PEFT), same batch.

    python benchmarks/train_step.py [--shapes tiny-32px,vit-b16-224] [--steps 10] [--json FILE]

Every variant does forward, cross-entropy, backward and an AdamW step on the same timm ViT and
batch; the ratios come from the same run. EMTAL is timed twice: the adapted model alone, and with
the QR replay batch it adds to every step once a buffer exists (a second forward/backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from cmtl.model import AdapterConfig, CMTLModel

SHAPES = {
    "tiny-32px": (dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3), 64),
    "vit-b16-224": (dict(), 8),
}


def seconds_per_step(step, steps: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]  # median


def make_step(forward, params, x, y, replay: bool = False):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-4)

    def step():
        loss = F.cross_entropy(forward(x), y)
        if replay:  # EMTAL's buffer batch: same size, its own forward
            loss = loss + F.mse_loss(forward(x.flip(0)), torch.zeros(x.shape[0], 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def peft_lora(vit: VisionTransformer, rank: int):
    from peft import LoraConfig, get_peft_model

    targets = [
        f"blocks.{i}.{m}"
        for i in range(len(vit.blocks))
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    return get_peft_model(
        vit, LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, modules_to_save=["head"])
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    report = {"threads": torch.get_num_threads(), "shapes": {}}
    for name in args.shapes.split(","):
        kw, batch = SHAPES[name]
        size = kw.get("img_size", 224)
        base = VisionTransformer(num_classes=10, **kw)
        x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

        naive = copy.deepcopy(base).train()
        t_naive = seconds_per_step(make_step(naive, naive.parameters(), x, y), args.steps)

        lora = peft_lora(copy.deepcopy(base), args.rank).train()
        t_lora = seconds_per_step(make_step(lora, lora.parameters(), x, y), args.steps)

        backbone = copy.deepcopy(base)
        backbone.reset_classifier(0)
        emtal = CMTLModel(backbone, AdapterConfig(num_experts=args.experts, rank=args.rank)).train()
        emtal.add_task(10)
        for p in emtal.adapter_parameters():  # non-zero so no branch is skipped
            torch.nn.init.normal_(p, std=0.01)
        fwd = lambda t, m=emtal: m(t, 0)  # noqa: E731
        t_emtal = seconds_per_step(make_step(fwd, emtal.trainable_parameters(), x, y), args.steps)
        t_emtal_qr = seconds_per_step(make_step(fwd, emtal.trainable_parameters(), x, y, True), args.steps)
        row = {
            "batch": batch,
            "naive_s": t_naive,
            "peft_lora_s": t_lora,
            "emtal_s": t_emtal,
            "emtal_with_replay_s": t_emtal_qr,
            "emtal/naive": t_emtal / t_naive,
            "emtal_with_replay/naive": t_emtal_qr / t_naive,
            "emtal/peft_lora": t_emtal / t_lora,
        }
        report["shapes"][name] = row
        print(
            f"{name} batch {batch}: naive {t_naive:.3f}s, PEFT LoRA {t_lora:.3f}s, EMTAL {t_emtal:.3f}s, "
            f"EMTAL+replay {t_emtal_qr:.3f}s | EMTAL/naive {row['emtal/naive']:.2f} (goal <= 1), "
            f"EMTAL+replay/naive {row['emtal_with_replay/naive']:.2f}, "
            f"EMTAL/LoRA {row['emtal/peft_lora']:.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
