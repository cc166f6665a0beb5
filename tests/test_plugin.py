"""EMTALPlugin inside a plain Avalanche Naive strategy on a small digits stream."""

import pytest
import torch

from cmtl.continual import EMTALConfig, fading_coefficient
from cmtl.model import AdapterConfig, CMTLModel
from cmtl.qr import QRConfig


@pytest.mark.parametrize(
    "step,total,expected", [(0, 100, 1.0), (55, 100, 0.0), (99, 100, 0.0), (27, 100, 1 - 27 / 55)]
)
def test_fading_schedule(step, total, expected):
    assert fading_coefficient(step, total) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["til", "cil"])
def test_naive_with_emtal_plugin_trains_three_experiences(mode):
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from cmtl.scenarios import create_scenario
    from cmtl.strategies import AvalancheCMTL, EMTALPlugin
    from timm.models.vision_transformer import VisionTransformer

    stream = create_scenario(
        "digits", mode=mode, n_tasks=3, classes_per_task=2, image_size=16, max_per_class=40
    )
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    model = AvalancheCMTL(CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode=mode))
    plugin = EMTALPlugin(EMTALConfig(qr=QRConfig(budget=24)))
    events = []

    class Spy(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            held = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
            newest = model.cmtl.adapter_parameters()
            events.append(("optimizer_holds_adapter", bool(newest) and all(id(p) in held for p in newest)))

        def before_training_iteration(self, strategy, **kw):
            if not events or events[-1][0] != "iter":
                events.append(("iter", None))

        def after_training_exp(self, strategy, **kw):
            events.append(("faded", model.cmtl.fading()))

    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), forgetting_metrics(experience=True), loggers=[]
    )
    strategy = Naive(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_mb_size=16,
        eval_mb_size=64,
        train_epochs=2,
        plugins=[plugin, Spy()],
        evaluator=evaluator,
    )
    for exp in stream.benchmark.train_stream:
        strategy.train(exp)
        metrics = strategy.eval(stream.benchmark.test_stream[: exp.current_experience + 1])
    cmtl = model.cmtl
    assert cmtl.num_tasks == 3 and cmtl.open_adapters == [] and len(cmtl.merged_adapters) == 3
    assert len(plugin.controller.qr) == 24
    assert any(k.startswith("Top1_Acc_Stream") for k in metrics)
    assert any("Forgetting" in k for k in metrics)
    # each experience: the new adapter is in the optimizer, training runs, and the router is at 0
    # by the end of the experience (EMTALPlugin runs first, so it has already merged)
    assert [e[0] for e in events] == ["optimizer_holds_adapter", "iter", "faded"] * 3
    assert all(e[1] for e in events if e[0] == "optimizer_holds_adapter")
    assert "qr" in plugin.last_losses and "qr_in" in plugin.last_losses


def test_controller_fades_to_exactly_zero_and_merges_every_k():
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    ctl = EMTALController(
        CMTLModel(vit, AdapterConfig(num_experts=4, rank=2)), EMTALConfig(consolidate_every=2)
    )
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    for task in range(2):
        ctl.start_task(2, x, y)
        assert ctl.on_step(10) == 1.0
        for _ in range(9):
            ctl.on_step(10)
        assert ctl.model.fading()[f"task{task}"] == 0.0
        ctl.record_pool()
        merged = ctl.end_task()
        assert merged == (task == 1)
    assert ctl.model.open_adapters == [] and len(ctl.qr) > 0


@pytest.mark.parametrize("replay_batch", [None, 3])
def test_replay_batch_size_sets_the_buffer_samples_per_step(replay_batch):
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController

    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    qr = QRConfig(budget=8, batch_size=replay_batch)
    ctl = EMTALController(CMTLModel(vit, AdapterConfig(num_experts=4, rank=2)), EMTALConfig(qr=qr))
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    ctl.start_task(2, x, y)
    ctl.record_pool()
    ctl.end_task()
    ctl.start_task(2, x, y)  # task-incremental: labels are the task's own
    drawn = []
    real = ctl.qr.sample
    ctl.qr.sample = lambda n, **kw: drawn.append(n) or real(n, **kw)
    logits = ctl.model(x[:5], 1)
    losses = ctl.losses(logits, torch.arange(5) % 2)
    assert drawn == [replay_batch or 5] and losses["qr"].item() >= 0
    with pytest.raises(ValueError, match="QRConfig.batch_size must be an int >= 1 or None, got 0"):
        QRConfig(batch_size=0)


def test_feature_distillation_holds_buffer_features_where_the_task_found_them():
    """`feature_distill`: the term is the weight times the mean squared change of the buffer
    batch's features since the task started: zero before anything moved, the change's square once
    the final norm's bias moved by 0.5; it reaches the trainable weights, survives a checkpoint
    inside the task and ends with the task (the buffer then takes new samples)."""
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    cfg = EMTALConfig(qr=QRConfig(budget=8), feature_distill=2.0)
    ctl = EMTALController(CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode="cil"), cfg)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 2
    ctl.start_task(2, x, y)
    ctl.note_memory()  # empty buffer: nothing to hold
    assert ctl.buffer_start is None and "qr_feat" not in ctl.losses(ctl.model(x), y)
    ctl.record_pool()
    ctl.end_task()
    ctl.start_task(2, x, y + 2)
    ctl.note_memory()
    assert ctl.buffer_start.shape == (len(ctl.qr), 32)
    ctl.model.eval()  # no dropout, so the features are those the buffer's were taken with
    assert ctl.losses(ctl.model(x), y + 2)["qr_feat"].item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        ctl.model.backbone.norm.bias.add_(0.5)
    term = ctl.losses(ctl.model(x), y + 2)["qr_feat"]
    assert term.item() == pytest.approx(2.0 * 0.25, rel=1e-4)
    term.backward()
    lora = [p for n, p in ctl.model.named_parameters() if p.requires_grad and "lora" in n.lower()]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    again = EMTALController(ctl.model, cfg)
    again.load_state_dict(ctl.state_dict())
    assert torch.equal(again.buffer_start, ctl.buffer_start)
    ctl.record_pool()
    ctl.end_task()
    assert ctl.buffer_start is None
    with pytest.raises(ValueError, match="feature_distill=-1.0 must be >= 0"):
        EMTALConfig(feature_distill=-1.0)


def _two_blob_images(n: int, label_offset: int = 0):
    """Images whose classes differ in colour: easy for class means, unseen by a random head."""
    y = torch.arange(n) % 2
    x = torch.randn(n, 3, 16, 16) * 0.3
    x[y == 0, 0] += 1.0
    x[y == 1, 2] += 1.0
    return x, y + label_offset


@pytest.mark.parametrize("head_init", ["prototype", "probe"])
@pytest.mark.parametrize("mode", ["til", "cil"])
def test_head_init_classifies_the_new_task_before_any_step(mode, head_init):
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode=mode)
    ctl = EMTALController(model, EMTALConfig(qr=None, head_init=head_init))
    ctl.start_task(2)
    offset = 2 if mode == "cil" else 0
    ctl.start_task(2)  # the second task: CIL labels 2, 3 go to the newest head's rows
    x, y = _two_blob_images(64, offset)
    task = torch.full((64,), 1)

    def accuracy():
        with torch.no_grad():
            logits = model(x, task) if mode == "til" else model(x)[:, offset:]
        return float((logits.argmax(dim=1) == y - offset).float().mean())

    assert accuracy() < 0.8  # the random head does not know the classes
    assert ctl.init_head([(x[:40], y[:40]), (x[40:], y[40:])])
    assert accuracy() >= 0.95
    assert model.training  # the training mode is restored
    with pytest.raises(ValueError, match="label 5 is not one of the classes of heads 1..1"):
        ctl.init_head([(x[:2], torch.tensor([offset, 5]))])


def test_plugin_starts_each_head_from_the_experience_class_means():
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from cmtl.scenarios import create_scenario
    from cmtl.strategies import AvalancheCMTL, EMTALPlugin
    from timm.models.vision_transformer import VisionTransformer

    stream = create_scenario(
        "digits", mode="cil", n_tasks=2, classes_per_task=2, image_size=16, max_per_class=20
    )
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    model = AvalancheCMTL(CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode="cil"))
    checked = []

    class Check(SupervisedPlugin):
        def before_training_exp(self, strategy, **kw):
            data = strategy.experience.dataset.eval()
            x = torch.stack([data[i][0] for i in range(len(data))])
            y = torch.as_tensor([int(data[i][1]) for i in range(len(data))])
            first = 2 * strategy.experience.current_experience
            cmtl = model.cmtl
            cmtl.eval()
            with torch.no_grad():
                f = cmtl.forward_features(x)
                means = torch.stack([f[y == first + c].mean(0) for c in range(2)])
                nearest = torch.cdist(f, means).argmin(dim=1)
                chosen = cmtl(x)[:, first : first + 2].argmax(dim=1)
            cmtl.train()
            checked.append(bool(torch.equal(chosen, nearest)))

    strategy = Naive(
        model,
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_mb_size=16,
        train_epochs=1,
        plugins=[EMTALPlugin(EMTALConfig(qr=None, head_init="prototype"), pool_batch_size=16), Check()],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    for exp in stream.benchmark.train_stream:
        strategy.train(exp)
    assert checked == [True, True]


@pytest.mark.parametrize("mode", ["til", "cil"])
def test_refresh_buffer_keeps_the_best_of_stored_and_final_model_logits(mode):
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController
    from cmtl.qr import logit_quality

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    qr = QRConfig(budget=12, selection="reservoir", refresh=True)
    model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode=mode)
    ctl = EMTALController(model, EMTALConfig(qr=qr, head_init="prototype"))
    seen = []
    real = ctl.qr.refresh
    ctl.qr.refresh = lambda logits, **kw: (
        seen.append((ctl.qr.buffer["quality"].clone(), real(logits, **kw))) or seen[-1][1]
    )
    for task in range(2):
        x, y = _two_blob_images(12, label_offset=2 * task if mode == "cil" else 0)
        ctl.start_task(2, x, y)
        ctl.init_head([(x, y)])
        ctl.record_pool()
        if task == 1:
            with torch.no_grad():  # sharper task-0 logits: its correct samples gain margin
                for p in model.heads.heads[0].parameters():
                    p[:2].mul_(2.0)
        ctl.end_task()
    assert len(seen) == 2
    before, replaced = seen[1]
    b = ctl.qr.buffer
    with torch.no_grad():
        model.eval()
        now = torch.cat(
            [
                model(ctl.qr.buffer_images()[i : i + 1], int(t) if mode == "til" else None)
                for i, t in enumerate(b["task"])
            ]
        )
    valid = torch.arange(now.shape[1])[None, :] < b["num_valid"][:, None]
    now_quality = logit_quality(now.masked_fill(~valid, float("-inf")), b["y"])
    expected = torch.maximum(before, now_quality)
    assert torch.allclose(b["quality"], expected)
    gained = now_quality > before + 1e-4  # one sample at a time here: float noise of 1e-6 otherwise
    assert replaced == int(gained.sum()) and bool(gained[b["task"] == 0].all()) and replaced > 0


@pytest.mark.parametrize("mode", ["til", "cil"])
def test_refresh_latest_stores_the_final_model_logits_on_every_class_seen(mode):
    from timm.models.vision_transformer import VisionTransformer

    from cmtl.continual import EMTALController

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0)
    qr = QRConfig(budget=12, selection="reservoir", refresh=True, refresh_keep="latest")
    model = CMTLModel(vit, AdapterConfig(num_experts=4, rank=2), mode=mode)
    ctl = EMTALController(model, EMTALConfig(qr=qr, head_init="prototype"))
    for task in range(2):
        x, y = _two_blob_images(12, label_offset=2 * task if mode == "cil" else 0)
        ctl.start_task(2, x, y)
        ctl.init_head([(x, y)])
        ctl.record_pool()
        ctl.end_task()
    b = ctl.qr.buffer
    assert set(b["task"].tolist()) == {0, 1}
    with torch.no_grad():
        model.eval()
        x = ctl.qr.buffer_images()
        now = (
            torch.cat([model(x[i : i + 1], int(t)) for i, t in enumerate(b["task"])])
            if mode == "til"
            else model(x, None)
        )
    # class-incremental: task 0's samples now hold all 4 classes' logits, not their own 2
    assert b["num_valid"].tolist() == [2 if mode == "til" else 4] * len(b["y"])
    assert torch.allclose(b["logits"], now, atol=1e-5)
