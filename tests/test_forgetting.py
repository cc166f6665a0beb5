"""On a seeded stream of real digits, EMTAL forgets task 0 less than naive fine-tuning and plain LoRA."""

import pytest
import torch


def _task0_forgetting(name: str, seed: int = 0) -> tuple[float, float]:
    """Task-0 forgetting of the registered strategy `name` (same model, data, optimiser and seed)."""
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training.plugins import EvaluationPlugin
    from cmtl.scenarios import create_scenario
    from cmtl.strategies import build_strategy
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.config import ExperimentConfig
    from cmtl.model import CMTLModel
    from cmtl.recipes import strategy_spec

    cfg = ExperimentConfig()
    cfg.model.num_experts, cfg.model.rank = 4, 4
    cfg.strategy.buffer_size, cfg.strategy.scheduler = 100, "none"
    torch.manual_seed(seed)
    stream = create_scenario("digits", mode="til", n_tasks=5, image_size=16, seed=seed)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    spec = strategy_spec(name, cfg.model, cfg.strategy, seed=seed)
    model = CMTLModel(vit, spec.adapter)
    strategy = build_strategy(
        spec, model, cfg.strategy, evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
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
def test_emtal_forgets_less_on_average_over_seeds():
    # single seeds of a from-scratch backbone can go either way for naive fine-tuning (its backbone
    # also gets better at digits as tasks arrive); the mean over three seeds is what is claimed
    runs = [
        {name: _task0_forgetting(name, seed)[0] for name in ("naive", "lora", "emtal")} for seed in (0, 1, 2)
    ]
    mean = {name: sum(r[name] for r in runs) / len(runs) for name in runs[0]}
    assert mean["emtal"] < min(mean["naive"], mean["lora"]), runs
