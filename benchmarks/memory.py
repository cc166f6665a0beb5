"""Memory and size: trainable parameters per task for every strategy, QR buffer bytes per stored
sample, classifier-alignment statistics bytes per class, and the peak RSS of a whole `cmtl run`.

    python benchmarks/memory.py [--run-config CONFIG] [--no-run] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer

from cmtl.alignment import COVARIANCES, ClassStatistics
from cmtl.config import STRATEGY_NAMES, ExperimentConfig
from cmtl.model import CMTLModel
from cmtl.qr import STORAGES, QRBuffer, QRConfig
from cmtl.recipes import strategy_spec

SHAPES = {
    "tiny-32px": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3),
    "vit-b16-224": dict(),
}


def trainable_per_task(kw: dict, experts: int, rank: int, classes: int = 10) -> dict[str, int]:
    """Parameters each strategy trains for one new task (head included), on the same backbone."""
    cfg = ExperimentConfig()
    cfg.model.num_experts, cfg.model.rank = experts, rank
    out = {}
    for name in STRATEGY_NAMES:
        spec = strategy_spec(name, cfg.model, cfg.strategy)
        model = CMTLModel(VisionTransformer(num_classes=0, **kw), spec.adapter)
        model.set_backbone_trainable(spec.backbone_trainable)
        model.add_task(classes)
        model.add_task(classes)  # the second task: earlier adapters are frozen by then
        out[name] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def buffer_bytes_per_sample(size: int, storage: str = "float32", classes: int = 10, n: int = 20) -> float:
    buf = QRBuffer(QRConfig(budget=n, storage=storage))
    x = torch.rand(n, 3, size, size)
    y = torch.arange(n) % classes
    buf.begin_task(0, x, y, num_valid_classes=classes)
    buf.record(torch.randn(n, classes))
    buf.end_task()
    return buf.nbytes() / len(buf)


def alignment_bytes(dim: int, covariance: str, classes: int = 4) -> tuple[float, float]:
    """Bytes of `strategy.classifier_alignment`'s statistics under `alignment_covariance`: per class
    (mean, and the class's own covariance) and once (a shared covariance)."""
    stats = ClassStatistics(covariance=covariance)
    stats.update(torch.randn(classes * (dim + 1), dim), torch.arange(classes).repeat_interleave(dim + 1))
    total = sum(t.nbytes for t in stats.state_dict().values())
    fixed = stats.covs.nbytes + stats.scatter_dof.nbytes if covariance == "shared" else 0
    return (total - fixed) / classes, float(fixed)


def peak_rss_of_run(config: str | None) -> float:
    """MiB: the maximum resident set size of a `cmtl run` subprocess."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "cmtl", "run", "--no-progress", "--out", str(Path(tmp) / "run")]
        if config:
            cmd.insert(3, config)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-config", default=None, help="config of the measured run (default: embedded)")
    ap.add_argument("--no-run", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    report: dict = {"trainable_per_task": {}, "buffer_bytes_per_sample": {}}
    for name, kw in SHAPES.items():
        experts = 16 if name.startswith("vit-b") else 8
        counts = trainable_per_task(kw, experts=experts, rank=4)
        report["trainable_per_task"][name] = counts
        print(f"{name} (E={experts}, r=4): trainable parameters per task, head included")
        for strat, n in counts.items():
            print(f"  {strat:16s} {n:>12,d}")
    for storage in STORAGES:
        report["buffer_bytes_per_sample"][storage] = {}
        for size in (32, 224):
            b = buffer_bytes_per_sample(size, storage)
            report["buffer_bytes_per_sample"][storage][f"{size}px"] = b
            print(f"QR buffer ({storage}) at {size}px, 10 classes: {b:,.0f} bytes per stored sample")
    report["alignment_bytes"] = {}
    for name, dim in (("tiny-32px", 192), ("vit-b16-224", 768)):
        report["alignment_bytes"][name] = {}
        for covariance in COVARIANCES:
            per_class, fixed = alignment_bytes(dim, covariance)
            report["alignment_bytes"][name][covariance] = {"per_class": per_class, "fixed": fixed}
            print(
                f"classifier alignment statistics, {name} ({dim} features), {covariance} covariance: "
                f"{per_class:,.0f} bytes per class + {fixed:,.0f}"
            )
    if not args.no_run:
        rss = peak_rss_of_run(args.run_config)
        report["peak_rss_mib"] = {"config": args.run_config or "default", "value": rss}
        print(f"peak RSS of `cmtl run {args.run_config or ''}`: {rss:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
