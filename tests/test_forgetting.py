"""On a seeded stream of real digits, EMTAL forgets task 0 less than naive fine-tuning and plain LoRA."""

import pytest
import torch


def _task0_forgetting(name: str, seed: int = 0) -> tuple[float, float]:
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from cmtl.scenarios import create_scenario
    from cmtl.strategies import AvalancheCMTL, EMTALPlugin
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALConfig
    from cmtl.model import AdapterConfig, CMTLModel
    from cmtl.qr import QRConfig

    torch.manual_seed(seed)
    stream = create_scenario("digits", mode="til", n_tasks=5, image_size=16, seed=seed)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    if name == "naive":  # full fine-tuning; the plugin only adds a head per task
        model = CMTLModel(vit, None)
        model.set_backbone_trainable(True)
        cfg = EMTALConfig(qr=None)
    elif name == "lora":  # one plain LoRA per task, merged after it; no experts, no QR
        model = CMTLModel(vit, AdapterConfig(moe=False, rank=4))
        cfg = EMTALConfig(qr=None, fading=False)
    else:
        model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=4))
        cfg = EMTALConfig(qr=QRConfig(budget=100))
    net = AvalancheCMTL(model)
    strategy = Naive(
        net,
        torch.optim.AdamW(net.parameters(), lr=1e-3),
        train_mb_size=32,
        eval_mb_size=256,
        train_epochs=4,
        plugins=[EMTALPlugin(cfg)],
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
    )
    key = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"
    for exp in stream.benchmark.train_stream:
        strategy.train(exp)
        if exp.current_experience == 0:
            first = strategy.eval(stream.benchmark.test_stream[:1])[key]
    last = strategy.eval(stream.benchmark.test_stream)[key]
    return first - last, last


def test_emtal_forgets_task0_less_than_naive_and_lora():
    forgetting = {name: _task0_forgetting(name)[0] for name in ("naive", "lora", "emtal")}
    assert forgetting["naive"] > 0.05  # the stream really causes forgetting
    assert forgetting["emtal"] < forgetting["naive"], forgetting
    assert forgetting["emtal"] < forgetting["lora"], forgetting


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_emtal_forgets_less_other_seeds(seed):
    f = {name: _task0_forgetting(name, seed)[0] for name in ("naive", "lora", "emtal")}
    assert f["emtal"] < min(f["naive"], f["lora"]), f
